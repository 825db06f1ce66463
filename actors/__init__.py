"""Ray actors (AttentionStage, ExpertShard), placement and the driver: the actor-graph issue."""
