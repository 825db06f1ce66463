"""Data: the built-in corpus, tokenizer training and (later) Parquet shards and the resumable loader."""
