{{/* Chart name, truncated to 63 characters. */}}
{{- define "ringcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name, truncated so suffixes ("-nodes") still fit. */}}
{{- define "ringcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ringcache.nodes" -}}{{ include "ringcache.fullname" . }}-nodes{{- end -}}
{{- define "ringcache.orchestrator" -}}{{ include "ringcache.fullname" . }}-orchestrator{{- end -}}
{{- define "ringcache.jaeger" -}}{{ include "ringcache.fullname" . }}-jaeger{{- end -}}

{{- define "ringcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ringcache.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ringcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ringcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (list $ "cache-node"). */}}
{{- define "ringcache.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "ringcache.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
The image. No image is published, so there is no default to fall back on:
a chart that rendered one would install pods stuck in ImagePullBackOff.
*/}}
{{- define "ringcache.image" -}}
{{- if not .Values.image.repository -}}
{{- fail "image.repository is not set: ringcache publishes no image. Build one from the repository (scripts/build-image.sh --push <registry>/ringcache:<tag>, or docker build -t <registry>/ringcache:<tag> . && docker push <registry>/ringcache:<tag>), then install with --set image.repository=<registry>/ringcache --set image.tag=<tag> (README: Install on Kubernetes)." -}}
{{- end -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/*
A Kubernetes memory quantity ("1Gi", "768Mi", "2G", "1048576") in bytes.
*/}}
{{- define "ringcache.bytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $num := regexFind "^[0-9]+" $q -}}
{{- $unit := trimPrefix $num $q -}}
{{- if or (not $num) (and $unit (not (hasKey $units $unit))) -}}
{{- fail (printf "%q is not a memory quantity like 1Gi, 768Mi or 1048576" $q) -}}
{{- end -}}
{{- if $unit -}}{{ mul (atoi $num) (get $units $unit) }}{{- else -}}{{ atoi $num }}{{- end -}}
{{- end -}}

{{/* limits.maxKeyBytes and limits.maxValueBytes in bytes: a number, or a
quantity like 1Ki or 1Mi, as cacheNode.memory. */}}
{{- define "ringcache.keyBytes" -}}
{{- include "ringcache.bytes" .Values.limits.maxKeyBytes -}}
{{- end -}}
{{- define "ringcache.valueBytes" -}}
{{- include "ringcache.bytes" .Values.limits.maxValueBytes -}}
{{- end -}}

{{/*
The node's --capacity in bytes: cacheNode.capacity, or 75% of
cacheNode.memory. Refuses a capacity above 80% of the memory limit, and one
whose shards cannot hold the largest entry.
*/}}
{{- define "ringcache.capacityBytes" -}}
{{- $memory := include "ringcache.bytes" .Values.cacheNode.memory | atoi -}}
{{- $capacity := 0 -}}
{{- if .Values.cacheNode.capacity -}}
{{- $capacity = include "ringcache.bytes" .Values.cacheNode.capacity | atoi -}}
{{- else -}}
{{- $capacity = div (mul $memory 3) 4 -}}
{{- end -}}
{{- if gt (mul $capacity 10) (mul $memory 8) -}}
{{- fail (printf "cacheNode.capacity (%d bytes) exceeds 80%% of cacheNode.memory (%s = %d bytes): leave at least 20%% of the container's memory for the runtime, connections and allocator slack, or the node will be OOM-killed" $capacity .Values.cacheNode.memory $memory) -}}
{{- end -}}
{{- $entry := add (include "ringcache.keyBytes" . | atoi) (include "ringcache.valueBytes" . | atoi) 4096 -}}
{{- if gt $entry (div $capacity .Values.cacheNode.shards) -}}
{{- fail (printf "cacheNode.capacity / cacheNode.shards (%d bytes) cannot hold the largest entry (limits.maxKeyBytes + limits.maxValueBytes + overhead); raise the capacity or lower the shards" (div $capacity .Values.cacheNode.shards)) -}}
{{- end -}}
{{- $capacity -}}
{{- end -}}

{{/*
The gRPC message limit both binaries derive from limits (the larger of
4 MiB and one maximal Set): an in-flight byte budget must hold one.
*/}}
{{- define "ringcache.messageBytes" -}}
{{- max (add (include "ringcache.keyBytes" . | atoi) (include "ringcache.valueBytes" . | atoi) 65536) 4194304 -}}
{{- end -}}

{{/*
A node's --max-in-flight-bytes: half of what its memory limit leaves beside
the cache's capacity (the rest is for the runtime and allocator slack), so
overload is shed with RESOURCE_EXHAUSTED before it can OOM-kill the pod.
Measured (RELIABILITY.md, integration-tests/tests/memory.rs): 400 calls with
3.7 MB answers peak at the budget × 1.5 above the node's resting memory.
*/}}
{{- define "ringcache.nodeInFlightBytes" -}}
{{- $memory := include "ringcache.bytes" .Values.cacheNode.memory | atoi -}}
{{- $capacity := include "ringcache.capacityBytes" . | atoi -}}
{{- $records := add (include "ringcache.changeLogBytes" . | atoi) (include "ringcache.debtBytes" . | atoi) -}}
{{- max (div (sub (sub $memory $capacity) $records) 2) (include "ringcache.messageBytes" . | atoi) -}}
{{- end -}}

{{/*
A node's --change-log-bytes and --debt-bytes: the binary's defaults (32 MiB
and 16 MiB, measured at their bound in BENCHMARKS.md), or 1/32 and 1/64 of
the memory limit when that is less, so that with a small limit they do not
take the room left beside the cache. The in-flight budget above is what
remains after them.
*/}}
{{- define "ringcache.changeLogBytes" -}}
{{- min 33554432 (div (include "ringcache.bytes" .Values.cacheNode.memory | atoi) 32) -}}
{{- end -}}

{{- define "ringcache.debtBytes" -}}
{{- min 16777216 (div (include "ringcache.bytes" .Values.cacheNode.memory | atoi) 64) -}}
{{- end -}}

{{/*
An orchestrator's --max-in-flight-bytes: half of its memory limit (it holds
no data; in-flight calls are what uses its memory). Measured (RELIABILITY.md):
400 calls with 3.7 MB answers peak at about the budget above its resting
memory (tens of MiB), so the default 512Mi limit and 256MiB budget leave room.
*/}}
{{- define "ringcache.orchestratorInFlightBytes" -}}
{{- $resources := .Values.orchestrator.resources | default dict -}}
{{- $limit := dig "limits" "memory" "" $resources | default (dig "requests" "memory" "512Mi" $resources) -}}
{{- $memory := include "ringcache.bytes" $limit | atoi -}}
{{- max (div $memory 2) (include "ringcache.messageBytes" . | atoi) -}}
{{- end -}}

{{/* The OTLP endpoint the workloads export to, if any. */}}
{{- define "ringcache.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint -}}
{{- .Values.tracing.otlpEndpoint -}}
{{- else if .Values.jaeger.enabled -}}
{{- if eq .Values.tracing.protocol "grpc" -}}
http://{{ include "ringcache.jaeger" . }}:4317
{{- else -}}
http://{{ include "ringcache.jaeger" . }}:4318
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by both workloads: pod identity and tracing. */}}
{{- define "ringcache.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RINGCACHE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RINGCACHE_MAX_KEY_BYTES
  value: {{ include "ringcache.keyBytes" . | quote }}
- name: RINGCACHE_MAX_VALUE_BYTES
  value: {{ include "ringcache.valueBytes" . | quote }}
- name: RINGCACHE_MAX_BATCH
  value: {{ .Values.limits.maxBatch | quote }}
{{- with include "ringcache.otlpEndpoint" . }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $.Values.tracing.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $.Values.tracing.samplingRatio | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "service.instance.id=$(POD_NAME),k8s.pod.name=$(POD_NAME),k8s.namespace.name={{ $.Release.Namespace }}"
{{- end }}
{{- end -}}

{{/* The restricted security context both workloads' containers run with. */}}
{{- define "ringcache.containerSecurityContext" -}}
{{- toYaml .Values.securityContext.container -}}
{{- end -}}

{{- define "ringcache.podSecurityContext" -}}
{{- toYaml .Values.securityContext.pod -}}
{{- end -}}

{{/* prometheus.io scrape annotations for a metrics port. */}}
{{- define "ringcache.scrapeAnnotations" -}}
{{- $ := index . 0 -}}
{{- if $.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Spread pods over nodes (hard) and zones (soft). */}}
{{- define "ringcache.topologySpread" -}}
{{- $ := index . 0 -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: DoNotSchedule
  # Tainted nodes the pods do not tolerate are not counted as empty hosts
  # (else the skew can never be met and pods stay Pending).
  nodeTaintsPolicy: Honor
  labelSelector:
    matchLabels:
      {{- include "ringcache.selectorLabels" (list $ (index . 1)) | nindent 6 }}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "ringcache.selectorLabels" (list $ (index . 1)) | nindent 6 }}
{{- end -}}

{{/* The Secret holding the orchestrators' TLS certificate. */}}
{{- define "ringcache.orchestratorTlsSecret" -}}
{{- .Values.tls.orchestrator.existingSecret | default (printf "%s-orchestrator-tls" (include "ringcache.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding the nodes' TLS certificate. */}}
{{- define "ringcache.nodeTlsSecret" -}}
{{- .Values.tls.cacheNode.existingSecret | default (printf "%s-cache-node-tls" (include "ringcache.fullname" .)) -}}
{{- end -}}

{{/* The name node certificates carry and orchestrators check. */}}
{{- define "ringcache.nodeTlsName" -}}
{{ include "ringcache.nodes" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* The port kubelet gRPC probes use: the plaintext probe port with TLS. */}}
{{- define "ringcache.probePort" -}}
{{- $ctx := index . 0 -}}{{- $grpcPort := index . 1 -}}
{{- if $ctx.Values.tls.enabled -}}{{ $ctx.Values.tls.probePort }}{{- else -}}{{ $grpcPort }}{{- end -}}
{{- end -}}

{{/* Refuses TLS without a certificate source. */}}
{{- define "ringcache.tlsCheck" -}}
{{- if .Values.tls.enabled -}}
{{- if and (not .Values.tls.certManager.enabled) (or (not .Values.tls.orchestrator.existingSecret) (not .Values.tls.cacheNode.existingSecret)) -}}
{{- fail "tls.enabled needs certificates: set tls.certManager.enabled (with tls.certManager.issuerRef.name), or both tls.orchestrator.existingSecret and tls.cacheNode.existingSecret" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name: an Issuer or ClusterIssuer that signs with a CA" -}}
{{- end -}}
{{- end -}}
{{- end -}}
