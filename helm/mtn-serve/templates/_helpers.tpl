{{/* Chart name, cut to 63 characters (the Kubernetes label value limit). */}}
{{- define "mtn-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, cut to 63 characters; the release name alone when it already contains the chart name. */}}
{{- define "mtn-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* RayService name: KubeRay refuses names over 47 characters (it appends a 6-character suffix for the RayCluster
and "-serve-svc" for the Serve service). */}}
{{- define "mtn-serve.rayServiceName" -}}
{{- include "mtn-serve.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "mtn-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "mtn-serve.labels" -}}
helm.sh/chart: {{ include "mtn-serve.chart" . }}
{{ include "mtn-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mtn-platform
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels. */}}
{{- define "mtn-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mtn-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the Ray pods run as. */}}
{{- define "mtn-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mtn-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mtn-serve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Environment of the Ray containers (YAML list, or nothing). */}}
{{- define "mtn-serve.env" -}}
{{- $env := list }}
{{- with .Values.env }}
{{- if .mlflowTrackingUri }}{{ $env = append $env (dict "name" "MLFLOW_TRACKING_URI" "value" .mlflowTrackingUri) }}{{ end }}
{{- if .awsRegion }}{{ $env = append $env (dict "name" "AWS_REGION" "value" .awsRegion) }}{{ end }}
{{- if .hfHome }}{{ $env = append $env (dict "name" "HF_HOME" "value" .hfHome) }}{{ end }}
{{- end }}
{{- $env = concat $env (.Values.extraEnv | default list) }}
{{- if $env }}
{{- toYaml $env }}
{{- end }}
{{- end }}

{{/* Ray Serve config (`serve build` format) for serveConfigV2; `args` are serve.config.AppArgs. */}}
{{- define "mtn-serve.serveConfig" -}}
{{- $v := .Values }}
{{- $args := dict
  "pipeline" $v.model.pipeline
  "translators" ($v.translators | default dict)
  "english_route" $v.routes.english
  "hybrid_route" $v.routes.hybrid
  "fallback_route" $v.routes.fallback
  "scheduler" $v.model.scheduler
  "device" $v.model.device
  "dtype" $v.model.dtype
  "max_translators_per_replica" $v.maxTranslatorsPerReplica
  "limits" (dict
    "max_prompt_chars" $v.limits.maxPromptChars
    "max_width" $v.limits.maxWidth
    "max_height" $v.limits.maxHeight
    "max_steps" $v.limits.maxSteps
    "max_images" $v.limits.maxImages
    "max_guidance_scale" $v.limits.maxGuidanceScale)
  "batching" (dict
    "max_batch_size" $v.batching.maxBatchSize
    "batch_wait_timeout_s" $v.batching.batchWaitTimeoutS)
  "defaults" (dict
    "num_inference_steps" $v.defaults.numInferenceSteps
    "guidance_scale" $v.defaults.guidanceScale
    "width" $v.defaults.width
    "height" $v.defaults.height) }}
{{- $gen := dict
  "name" "Generator"
  "max_ongoing_requests" $v.generator.maxOngoingRequests
  "ray_actor_options" (dict "num_gpus" $v.generator.numGpus "num_cpus" $v.generator.numCpus) }}
{{- with $v.generator.autoscaling }}
{{- if .enabled }}
{{- $_ := set $gen "autoscaling_config" (dict "min_replicas" .minReplicas "max_replicas" .maxReplicas "target_ongoing_requests" .targetOngoingRequests) }}
{{- else }}
{{- $_ := set $gen "num_replicas" $v.generator.replicas }}
{{- end }}
{{- end }}
{{- $ingress := dict "name" "Ingress" "num_replicas" $v.serveIngress.replicas "ray_actor_options" (dict "num_cpus" $v.serveIngress.numCpus) }}
{{- $app := dict "name" "mtn" "route_prefix" "/" "import_path" "serve.app:build_app" "args" $args "deployments" (list $gen $ingress) }}
{{- toYaml (dict "applications" (list $app)) }}
{{- end }}

{{/* Checks a JSON schema cannot express; rendering stops with a clear message. */}}
{{- define "mtn-serve.validate" -}}
{{- $w := .Values.worker }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "worker.minReplicas (%d) must be <= worker.maxReplicas (%d)" (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "worker.replicas (%d) must be between worker.minReplicas (%d) and worker.maxReplicas (%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- $g := .Values.generator }}
{{- if and $g.autoscaling.enabled (gt (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas)) }}
{{- fail (printf "generator.autoscaling.minReplicas (%d) must be <= generator.autoscaling.maxReplicas (%d)" (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas)) }}
{{- end }}
{{- $numGpus := float64 $g.numGpus }}
{{- if gt $numGpus 0.0 }}
{{- if eq (int $w.gpus) 0 }}
{{- fail (printf "generator.numGpus is %v but worker.gpus is 0: set generator.numGpus=0 (and model.device=cpu) for CPU-only workers" $g.numGpus) }}
{{- end }}
{{- if gt $numGpus (float64 $w.gpus) }}
{{- fail (printf "generator.numGpus (%v) is more than one worker pod has (worker.gpus=%d)" $g.numGpus (int $w.gpus)) }}
{{- end }}
{{- $wanted := ternary $g.autoscaling.maxReplicas $g.replicas $g.autoscaling.enabled | int }}
{{- $pods := ternary $w.maxReplicas $w.replicas .Values.autoscaler.enabled | int }}
{{- $fit := mul $pods (floor (divf (float64 $w.gpus) $numGpus) | int) }}
{{- if gt $wanted $fit }}
{{- fail (printf "up to %d Generator replicas with %v GPU each need more GPUs than %d worker pod(s) with %d GPU(s) give (room for %d): raise worker.maxReplicas/worker.replicas or lower the Generator replicas" $wanted $g.numGpus $pods (int $w.gpus) $fit) }}
{{- end }}
{{- end }}
{{- $translators := .Values.translators | default dict }}
{{- range $key, $route := dict "routes.english" .Values.routes.english "routes.hybrid" .Values.routes.hybrid "routes.fallback" .Values.routes.fallback }}
{{- if and $route (ne $route "native") (not (hasKey $translators $route)) }}
{{- fail (printf "%s=%q is neither \"native\" nor a key of translators (%s)" $key $route (keys $translators | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.ingress.tls.enabled (not .Values.ingress.host) }}
{{- fail "ingress.tls.enabled needs ingress.host" }}
{{- end }}
{{- $mounts := list }}
{{- range .Values.scratchVolumes }}{{ $mounts = append $mounts .mountPath }}{{ end }}
{{- if and .Values.securityContext.readOnlyRootFilesystem (not (has "/tmp" $mounts)) }}
{{- fail "securityContext.readOnlyRootFilesystem is true but no scratchVolumes entry mounts /tmp: Ray needs a writable /tmp and /tmp/ray" }}
{{- end }}
{{- range .Values.scratchVolumes }}
{{- if and (eq .mountPath "/tmp/ray") (ne .name "ray-logs") }}
{{- fail (printf "scratchVolumes: the /tmp/ray volume must be named ray-logs (KubeRay's autoscaler sidecar mounts that name), not %q" .name) }}
{{- end }}
{{- end }}
{{- $name := include "mtn-serve.rayServiceName" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "RayService name %q is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): set fullnameOverride" $name) }}
{{- end }}
{{- end }}

{{/* Pod spec of a Ray node. Call with (dict "root" $ "group" .Values.head|.Values.worker "kind" "head"|"worker"). */}}
{{- define "mtn-serve.rayPodSpec" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $v := $root.Values -}}
serviceAccountName: {{ include "mtn-serve.serviceAccountName" $root }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ printf "ray-%s" .kind }}
    image: {{ include "mtn-serve.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- if eq .kind "head" }}
    ports:
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      - name: serve
        containerPort: 8000
    {{- end }}
    {{- with (include "mtn-serve.env" $root) }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with $v.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- $resources := deepCopy ($group.resources | default dict) }}
    {{- if and (eq .kind "worker") (gt (int $v.worker.gpus) 0) }}
    {{- $limits := $resources.limits | default dict }}
    {{- $_ := set $limits "nvidia.com/gpu" (int $v.worker.gpus) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    {{- with $v.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.scratchVolumes }}
    volumeMounts:
      {{- range . }}
      - name: {{ .name }}
        mountPath: {{ .mountPath }}
      {{- end }}
    {{- end }}
{{- $volumes := list }}
{{- range $v.scratchVolumes }}
{{- $emptyDir := dict }}
{{- with .medium }}{{ $_ := set $emptyDir "medium" . }}{{ end }}
{{- with .sizeLimit }}{{ $_ := set $emptyDir "sizeLimit" . }}{{ end }}
{{- $volumes = append $volumes (dict "name" .name "emptyDir" $emptyDir) }}
{{- end }}
{{- with $volumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
