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

{{/* The ServiceAccount of the head or the workers. Call with (dict "root" $ "kind" "head"|"worker"). */}}
{{- define "mtn-serve.serviceAccountName" -}}
{{- $sa := .root.Values.serviceAccount }}
{{- $name := (index $sa .kind | default dict).name }}
{{- if $sa.create }}
{{- $base := include "mtn-serve.fullname" .root | trunc (int (sub 62 (len .kind))) | trimSuffix "-" }}
{{- default (printf "%s-%s" $base .kind) $name }}
{{- else }}
{{- default "default" $name }}
{{- end }}
{{- end }}

{{/* Labels that select the Ray pods (head and workers) of this release. */}}
{{- define "mtn-serve.rayPodSelector" -}}
matchLabels:
  {{- include "mtn-serve.selectorLabels" . | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [ray-head, ray-worker]
{{- end }}

{{/* Labels of the `helm test` Pod (the NetworkPolicy admits it to the Serve port by them). */}}
{{- define "mtn-serve.helmTestLabels" -}}
{{ include "mtn-serve.selectorLabels" . }}
app.kubernetes.io/component: helm-test
{{- end }}

{{/* Image reference: repository[:tag][@digest]; an empty tag is refused unless a digest pins the image, and so is
the never-published ghcr.io/mtn-platform/ unless image.allowUnpublished. */}}
{{- define "mtn-serve.image" -}}
{{- $img := .Values.image }}
{{- if and (hasPrefix "ghcr.io/mtn-platform/" $img.repository) (not $img.allowUnpublished) }}
{{- fail (printf "image.repository %q was never published: build and push it yourself (`IMAGE=<registry>/mtn-serve:<tag> make image push`) and set image.repository=<registry>/mtn-serve, or image.allowUnpublished=true if you pushed it there yourself" $img.repository) }}
{{- end }}
{{- if not (or $img.tag $img.digest) }}
{{- fail "image.tag is empty: set image.tag (e.g. 0.1.0, the chart's appVersion) or image.digest (sha256:...) so every pod runs one known image" }}
{{- end }}
{{- $ref := $img.repository }}
{{- with $img.tag }}{{ $ref = printf "%s:%s" $ref . }}{{ end }}
{{- with $img.digest }}{{ $ref = printf "%s@%s" $ref . }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Mount path of the Kubernetes API token (what automountServiceAccountToken would mount). */}}
{{- define "mtn-serve.apiTokenPath" -}}
/var/run/secrets/kubernetes.io/serviceaccount
{{- end }}

{{/* Environment of the Ray containers (YAML list, or nothing). */}}
{{- define "mtn-serve.env" -}}
{{- $env := list }}
{{- with .Values.env }}
{{- if .mlflowTrackingUri }}{{ $env = append $env (dict "name" "MLFLOW_TRACKING_URI" "value" .mlflowTrackingUri) }}{{ end }}
{{- if .awsRegion }}{{ $env = append $env (dict "name" "AWS_REGION" "value" .awsRegion) }}{{ end }}
{{- if .hfHome }}{{ $env = append $env (dict "name" "HF_HOME" "value" .hfHome) }}{{ end }}
{{- end }}
{{- with .Values.auth.apiKeys }}
{{- if .enabled }}
{{- $ref := dict "secretKeyRef" (dict "name" .existingSecret "key" .secretKey) }}
{{- $env = append $env (dict "name" "MTN_API_KEYS" "valueFrom" $ref) }}
{{- end }}
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
    "max_guidance_scale" $v.limits.maxGuidanceScale
    "max_request_pixels" (int64 $v.limits.maxRequestPixels))
  "batching" (dict
    "max_batch_size" $v.batching.maxBatchSize
    "batch_wait_timeout_s" $v.batching.batchWaitTimeoutS
    "max_batch_pixels" (int64 $v.batching.maxBatchPixels))
  "admission" (dict
    "max_queued_requests" $v.admission.maxQueuedRequests
    "ingress_max_queued_requests" $v.admission.ingressMaxQueuedRequests
    "request_timeout_s" $v.admission.requestTimeoutS
    "retry_after_s" $v.admission.retryAfterS
    "max_body_bytes" (int64 $v.admission.maxBodyBytes))
  "defaults" (dict
    "num_inference_steps" $v.defaults.numInferenceSteps
    "guidance_scale" $v.defaults.guidanceScale
    "width" $v.defaults.width
    "height" $v.defaults.height) }}
{{- if $v.auth.apiKeys.enabled }}
{{- $_ := set $args "auth" (dict "api_keys_env" "MTN_API_KEYS" "required" true) }}
{{- end }}
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
{{- /* no max_queued_requests on either deployment: build_app sets them from args.admission, and a deployment
option here would override that */}}
{{- $ingress := dict
  "name" "Ingress"
  "num_replicas" $v.serveIngress.replicas
  "max_ongoing_requests" $v.serveIngress.maxOngoingRequests
  "ray_actor_options" (dict "num_cpus" $v.serveIngress.numCpus) }}
{{- $logging := dict "encoding" $v.logging.encoding "log_level" $v.logging.logLevel "enable_access_log" $v.logging.enableAccessLog }}
{{- $app := dict "name" "mtn" "route_prefix" "/" "import_path" "serve.app:build_app" "args" $args "deployments" (list $gen $ingress) "logging_config" $logging }}
{{- /* http_options: the proxy's, read when Serve starts on a new cluster (not changed on a running one) */}}
{{- $http := dict "request_timeout_s" $v.httpOptions.requestTimeoutS }}
{{- toYaml (dict "http_options" $http "applications" (list $app)) }}
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
{{- /* overload: the Ingress holds up to (Generator replicas x their max_ongoing_requests) calls in flight plus
admission.maxQueuedRequests queued at its handle (serve/app.py build_app); it needs a slot beyond those for /healthz */}}
{{- $generatorReplicas := ternary $g.autoscaling.maxReplicas $g.replicas $g.autoscaling.enabled | int }}
{{- $adm := .Values.admission }}
{{- $admitted := add (mul $generatorReplicas (int $g.maxOngoingRequests)) (int $adm.maxQueuedRequests) }}
{{- $ingressSlots := int .Values.serveIngress.maxOngoingRequests }}
{{- if le $ingressSlots $admitted }}
{{- fail (printf "serveIngress.maxOngoingRequests (%d) must be above %d = Generator max replicas (%d) x generator.maxOngoingRequests (%d) + admission.maxQueuedRequests (%d), the requests an Ingress replica holds for the Generator under load; else /healthz gets no slot: raise it to at least %d" $ingressSlots $admitted $generatorReplicas (int $g.maxOngoingRequests) (int $adm.maxQueuedRequests) (add1 $admitted)) }}
{{- end }}
{{- if le (float64 .Values.httpOptions.requestTimeoutS) (float64 $adm.requestTimeoutS) }}
{{- fail (printf "httpOptions.requestTimeoutS (%v) must be above admission.requestTimeoutS (%v): the proxy would cut admitted requests off with a plain 408 before the app's JSON 504" .Values.httpOptions.requestTimeoutS $adm.requestTimeoutS) }}
{{- end }}
{{- if gt (int64 .Values.limits.maxRequestPixels) (int64 .Values.batching.maxBatchPixels) }}
{{- fail (printf "limits.maxRequestPixels (%d) must be <= batching.maxBatchPixels (%d): such a request could never run" (int64 .Values.limits.maxRequestPixels) (int64 .Values.batching.maxBatchPixels)) }}
{{- end }}
{{- $translators := .Values.translators | default dict }}
{{- range $key, $route := dict "routes.english" .Values.routes.english "routes.hybrid" .Values.routes.hybrid "routes.fallback" .Values.routes.fallback }}
{{- if and $route (ne $route "native") (not (hasKey $translators $route)) }}
{{- fail (printf "%s=%q is neither \"native\" nor a key of translators (%s)" $key $route (keys $translators | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.podMonitor.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.metrics.from) }}
{{- fail "metrics.podMonitor.enabled needs networkPolicy.metrics.from (e.g. the Prometheus namespace): the NetworkPolicy would drop Prometheus's scrapes of port 8080" }}
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
{{- /* HF_HOME receives the hub downloads (pipeline, source encoders): on a read-only root it must be on a scratch volume */}}
{{- with .Values.env.hfHome }}
{{- $hf := . }}
{{- $onVolume := false }}
{{- range $mounts }}{{ if or (eq $hf .) (hasPrefix (printf "%s/" (trimSuffix "/" .)) $hf) }}{{ $onVolume = true }}{{ end }}{{ end }}
{{- if and $.Values.securityContext.readOnlyRootFilesystem (not $onVolume) }}
{{- fail (printf "env.hfHome=%q is on no scratchVolumes mountPath (%s): the root filesystem is read-only, so hub downloads would fail; put it under one, e.g. /home/ray/.cache/huggingface" $hf (join ", " $mounts)) }}
{{- end }}
{{- end }}
{{- with .Values.auth.apiKeys }}
{{- if and .enabled (not .existingSecret) }}
{{- fail "auth.apiKeys.enabled needs auth.apiKeys.existingSecret: the name of a Secret holding the comma-separated API keys under auth.apiKeys.secretKey" }}
{{- end }}
{{- end }}
{{- /* Ray auth and the API keys come from Secrets; an env entry of the same name would override or disable them. */}}
{{- $reserved := list "RAY_AUTH_MODE" "RAY_AUTH_TOKEN" "RAY_AUTH_TOKEN_PATH" "MTN_API_KEYS" }}
{{- range .Values.extraEnv }}
{{- if has .name $reserved }}
{{- fail (printf "extraEnv: %s is set by the chart (Ray token auth: rayAuth; API keys: auth.apiKeys), not by extraEnv" .name) }}
{{- end }}
{{- end }}
{{- /* The NetworkPolicy and the PodDisruptionBudget select pods by these labels: values must not overwrite them. */}}
{{- $selectorKeys := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" }}
{{- range $where, $labels := dict "commonLabels" .Values.commonLabels "head.podLabels" .Values.head.podLabels "worker.podLabels" .Values.worker.podLabels }}
{{- range $key, $_ := $labels }}
{{- if has $key $selectorKeys }}
{{- fail (printf "%s must not set %s: the chart's NetworkPolicy and PodDisruptionBudget select the Ray pods by it" $where $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $i, $peer := .Values.networkPolicy.operator.from }}
{{- $sel := $peer.podSelector | default dict }}
{{- if not (or $peer.ipBlock $sel.matchLabels $sel.matchExpressions) }}
{{- fail (printf "networkPolicy.operator.from[%d] needs a podSelector with labels (or an ipBlock): without one it opens the Ray dashboard to every pod it admits" $i) }}
{{- end }}
{{- end }}
{{- if and .Values.serviceAccount.create (eq (include "mtn-serve.serviceAccountName" (dict "root" . "kind" "head")) (include "mtn-serve.serviceAccountName" (dict "root" . "kind" "worker"))) }}
{{- fail "serviceAccount.head.name and serviceAccount.worker.name are equal: the workers would get the head's autoscaler rights" }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (not (kindIs "invalid" .minAvailable)) (not (kindIs "invalid" .maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (null the other one)" }}
{{- end }}
{{- if and .enabled (kindIs "invalid" .minAvailable) (kindIs "invalid" .maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
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
{{- $apiToken := and (eq .kind "head") $v.autoscaler.enabled -}}
serviceAccountName: {{ include "mtn-serve.serviceAccountName" (dict "root" $root "kind" .kind) }}
# no Ray container talks to the Kubernetes API{{ if $apiToken }}; the autoscaler sidecar gets its own projected token{{ end }}
automountServiceAccountToken: false
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
    ports:
      {{- if eq .kind "head" }}
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      - name: serve
        containerPort: 8000
      {{- end }}
      # Ray's Prometheus metrics (KubeRay starts every node with --metrics-export-port=8080); the PodMonitor's port
      - name: metrics
        containerPort: 8080
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
{{- if $apiToken }}
{{- /* what automountServiceAccountToken would mount, for the autoscaler sidecar only (autoscalerOptions.volumeMounts) */}}
{{- $sources := list
  (dict "serviceAccountToken" (dict "path" "token" "expirationSeconds" 3607))
  (dict "configMap" (dict "name" "kube-root-ca.crt" "items" (list (dict "key" "ca.crt" "path" "ca.crt"))))
  (dict "downwardAPI" (dict "items" (list (dict "path" "namespace" "fieldRef" (dict "apiVersion" "v1" "fieldPath" "metadata.namespace"))))) }}
{{- $volumes = append $volumes (dict "name" "autoscaler-api-token" "projected" (dict "defaultMode" 420 "sources" $sources)) }}
{{- end }}
{{- with $volumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
