{{/* Names and labels. */}}
{{- define "raymoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* <release> or <release>-raymoe, at most 40 characters: KubeRay derives longer names from it. */}}
{{- define "raymoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "raymoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raymoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raymoe.labels" -}}
{{ include "raymoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "raymoe.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* The MLflow tracking URI every Ray container gets (empty when there is none). */}}
{{- define "raymoe.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
http://{{ include "raymoe.fullname" . }}-mlflow.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}
{{- else -}}
{{ .Values.mlflow.externalUri }}
{{- end -}}
{{- end }}

{{- define "raymoe.dataClaim" -}}
{{- default (printf "%s-data" (include "raymoe.fullname" .)) .Values.storage.volume.existingClaim }}
{{- end }}

{{/* The RayJob's --output directory. */}}
{{- define "raymoe.pretrainOutput" -}}
{{- if .Values.pretrain.output -}}
{{ .Values.pretrain.output }}
{{- else if .Values.storage.volume.enabled -}}
{{ trimSuffix "/" .Values.storage.volume.mountPath }}/outputs/{{ .Values.pretrain.name }}
{{- else -}}
/home/ray/outputs/{{ .Values.pretrain.name }}
{{- end -}}
{{- end }}

{{/* The RayJob's train.checkpoint_uri (empty: checkpoints go under --output). */}}
{{- define "raymoe.pretrainCheckpointUri" -}}
{{- with .Values.storage.checkpointUri -}}
{{ trimSuffix "/" . }}/{{ $.Values.pretrain.name }}
{{- end -}}
{{- end }}

{{/* What the RayService serves: serve.checkpoint, else where the pretraining job saves. */}}
{{- define "raymoe.serveCheckpoint" -}}
{{- if .Values.serve.checkpoint -}}
{{ .Values.serve.checkpoint }}
{{- else if .Values.storage.checkpointUri -}}
{{ include "raymoe.pretrainCheckpointUri" . }}
{{- else -}}
{{ include "raymoe.pretrainOutput" . }}
{{- end -}}
{{- end }}

{{/* A shell word: quoted with single quotes unless it is made of safe characters only. */}}
{{- define "raymoe.shellWord" -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@+,%-]+$" . -}}
{{ . }}
{{- else if contains "'" . -}}
{{ fail (printf "pretrain: %q contains a single quote, which the job's entrypoint cannot carry" .) }}
{{- else -}}
{{ squote . }}
{{- end -}}
{{- end }}

{{/*
Deep merge in place: every key of src overwrites dst's, maps merge key by key, anything else
(lists included) is replaced. Unlike sprig's mergeOverwrite, a zero value (0, false, "") in src
still overwrites. Arguments: dst, src (maps). Renders nothing.
*/}}
{{- define "raymoe.deepMerge" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if and (kindIs "map" $value) (kindIs "map" (index $dst $key)) }}
{{- include "raymoe.deepMerge" (dict "dst" (index $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A cluster shape: the top-level rayCluster with one workload's overrides merged over it.
Arguments: root, overrides (a map). Returns YAML; use with fromYaml.
*/}}
{{- define "raymoe.shape" -}}
{{- $shape := deepCopy .root.Values.rayCluster }}
{{- include "raymoe.deepMerge" (dict "dst" $shape "src" (deepCopy (default dict .overrides))) }}
{{- toYaml $shape }}
{{- end }}

{{/* rayStartParams of a group: its own flags plus object-store-memory. */}}
{{- define "raymoe.rayStartParams" -}}
{{- $params := deepCopy (default dict .rayStartParams) }}
{{- if .objectStoreMemory }}
{{- $_ := set $params "object-store-memory" (toString (int64 .objectStoreMemory)) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* The environment of every Ray container. */}}
{{- define "raymoe.rayEnv" -}}
{{- $uri := include "raymoe.mlflowUri" . }}
{{- if $uri }}
- name: MLFLOW_TRACKING_URI
  value: {{ $uri | quote }}
{{- end }}
{{- with .Values.storage.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The serving containers' own environment: RAYMOE_API_KEY from serve.apiKeySecret (a list; empty without it). */}}
{{- define "raymoe.serveEnv" -}}
{{- with .Values.serve.apiKeySecret.name }}
- name: RAYMOE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.serve.apiKeySecret.key }}
{{- end }}
{{- end }}

{{/*
The pod template of a Ray head or worker group.
Arguments: root (the chart's context), group (head or a worker group of the shape),
shape (the whole shape), head (bool), extraEnv (EnvVars of this workload only, may be empty).
*/}}
{{- define "raymoe.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $gpu := .shape.gpuResourceName }}
metadata:
  labels:
    {{- include "raymoe.labels" $root | nindent 4 }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    fsGroup: 100  # the image's user `ray` is in group 100 (users): it can write the volumes
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "raymoe.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- $env := include "raymoe.rayEnv" $root }}
      {{- with .extraEnv }}
      {{- $env = printf "%s\n%s" $env (toYaml .) }}
      {{- end }}
      {{- if $env }}
      env:
        {{- $env | trim | nindent 8 }}
      {{- end }}
      {{- if or $root.Values.storage.s3.credentialsSecret $root.Values.envFrom }}
      envFrom:
        {{- with $root.Values.storage.s3.credentialsSecret }}
        - secretRef:
            name: {{ . }}
        {{- end }}
        {{- with $root.Values.envFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- if .head }}
      ports:
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: 8000}
      {{- end }}
      resources:
        requests:
          cpu: {{ $group.cpu | quote }}
          memory: {{ $group.memory | quote }}
          {{- if $group.gpus }}
          {{ $gpu }}: {{ int64 $group.gpus }}
          {{- end }}
        limits:
          cpu: {{ $group.cpu | quote }}
          memory: {{ $group.memory | quote }}
          {{- if $group.gpus }}
          {{ $gpu }}: {{ int64 $group.gpus }}
          {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if $root.Values.storage.volume.enabled }}
        - name: data
          mountPath: {{ $root.Values.storage.volume.mountPath }}
        {{- end }}
  volumes:
    - name: dshm  # Ray's object store and torch's shared memory; counts against the memory limit
      emptyDir:
        medium: Memory
    {{- if $root.Values.storage.volume.enabled }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "raymoe.dataClaim" $root }}
    {{- end }}
{{- end }}

{{/*
The spec of a RayCluster (also a RayJob's rayClusterSpec and a RayService's rayClusterConfig).
Arguments: root, overrides (the workload's rayCluster values), what (its name, for errors),
extraEnv (optional: EnvVars of every container of this workload only).
*/}}
{{- define "raymoe.rayClusterSpec" -}}
{{- $root := .root }}
{{- $what := .what }}
{{- $extraEnv := .extraEnv }}
{{- $shape := include "raymoe.shape" . | fromYaml }}
{{- if not $shape.workerGroups }}
{{- fail (printf "%s: rayCluster.workerGroups is empty: give at least one worker group" $what) }}
{{- end }}
rayVersion: {{ $root.Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $shape.enableInTreeAutoscaling }}
{{- if $shape.enableInTreeAutoscaling }}
autoscalerOptions:
  idleTimeoutSeconds: {{ int64 $shape.autoscaler.idleTimeoutSeconds }}
  upscalingMode: {{ $shape.autoscaler.upscalingMode }}
{{- end }}
{{- if eq $root.Values.auth.mode "token" }}
authOptions:
  mode: token
{{- end }}
headGroupSpec:
  serviceType: {{ $shape.head.serviceType }}
  rayStartParams:
    {{- include "raymoe.rayStartParams" $shape.head | nindent 4 }}
  template:
    {{- include "raymoe.rayPodTemplate" (dict "root" $root "group" $shape.head "shape" $shape "head" true "extraEnv" $extraEnv) | trim | nindent 4 }}
workerGroupSpecs:
{{- $seen := dict }}
{{- range $shape.workerGroups }}
{{- if hasKey $seen .name }}
{{- fail (printf "%s: rayCluster.workerGroups has two groups named %q" $what .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- if not (hasKey . "replicas") }}
{{- $_ := set . "replicas" .minReplicas }}
{{- end }}
{{- if gt (int64 .minReplicas) (int64 .maxReplicas) }}
{{- fail (printf "%s: worker group %q has minReplicas %v > maxReplicas %v" $what .name .minReplicas .maxReplicas) }}
{{- end }}
{{- if or (lt (int64 .replicas) (int64 .minReplicas)) (gt (int64 .replicas) (int64 .maxReplicas)) }}
{{- fail (printf "%s: worker group %q has replicas %v outside [minReplicas %v, maxReplicas %v]" $what .name .replicas .minReplicas .maxReplicas) }}
{{- end }}
  - groupName: {{ .name }}
    replicas: {{ int64 .replicas }}
    minReplicas: {{ int64 .minReplicas }}
    maxReplicas: {{ int64 .maxReplicas }}
    rayStartParams:
      {{- include "raymoe.rayStartParams" . | nindent 6 }}
    template:
      {{- include "raymoe.rayPodTemplate" (dict "root" $root "group" . "shape" $shape "head" false "extraEnv" $extraEnv) | trim | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Ray Serve's config for the RayService: files/serve-config.yaml (a link to deploy/serve/config.yaml)
with the serve.* values applied to its first application and that application's first deployment:
args.checkpoint, serve.args, serve.autoscaling (autoscaling_config), serve.replicaResources
(ray_actor_options), and args.require_api_key with serve.apiKeySecret (the key itself is only in
the containers' environment). Everything else is the file's.
*/}}
{{- define "raymoe.serveConfig" -}}
{{- $text := .Files.Get "files/serve-config.yaml" }}
{{- if not $text }}
{{- fail "files/serve-config.yaml is missing or empty: it must be a link to deploy/serve/config.yaml" }}
{{- end }}
{{- $config := fromYaml $text }}
{{- if hasKey $config "Error" }}
{{- fail (printf "files/serve-config.yaml (deploy/serve/config.yaml) is not valid YAML: %s" $config.Error) }}
{{- end }}
{{- if not $config.applications }}
{{- fail "deploy/serve/config.yaml has no applications" }}
{{- end }}
{{- $app := first $config.applications }}
{{- if not (hasKey $app "args") }}
{{- $_ := set $app "args" dict }}
{{- end }}
{{- $_ := set $app.args "checkpoint" (include "raymoe.serveCheckpoint" .) }}
{{- include "raymoe.deepMerge" (dict "dst" $app.args "src" .Values.serve.args) }}
{{- if .Values.serve.apiKeySecret.name }}
{{- $_ := set $app.args "require_api_key" true }}
{{- end }}
{{- if not $app.deployments }}
{{- fail "deploy/serve/config.yaml: the first application has no deployments to apply serve.autoscaling to" }}
{{- end }}
{{- $deployment := first $app.deployments }}
{{- if not (hasKey $deployment "autoscaling_config") }}
{{- $_ := set $deployment "autoscaling_config" dict }}
{{- end }}
{{- include "raymoe.deepMerge" (dict "dst" $deployment.autoscaling_config "src" .Values.serve.autoscaling) }}
{{- $scaling := $deployment.autoscaling_config }}
{{- if and (hasKey $scaling "min_replicas") (hasKey $scaling "max_replicas") }}
{{- if gt (int64 $scaling.min_replicas) (int64 $scaling.max_replicas) }}
{{- fail (printf "serve.autoscaling: min_replicas %v > max_replicas %v" $scaling.min_replicas $scaling.max_replicas) }}
{{- end }}
{{- end }}
{{- if not (hasKey $deployment "ray_actor_options") }}
{{- $_ := set $deployment "ray_actor_options" dict }}
{{- end }}
{{- include "raymoe.deepMerge" (dict "dst" $deployment.ray_actor_options "src" .Values.serve.replicaResources) }}
{{- toYaml $config }}
{{- end }}
