{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "anomalyd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The `helm test` pod's app.kubernetes.io/name: the name cut so that "-check" keeps it a label value (63). */}}
{{- define "anomalyd.checkName" -}}
{{- printf "%s-check" (include "anomalyd.name" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "anomalyd.fullname" -}}
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

{{- define "anomalyd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "anomalyd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "anomalyd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "anomalyd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: detector
app.kubernetes.io/part-of: {{ .Chart.Name }}
{{- end }}

{{- define "anomalyd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "anomalyd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference: tag defaults to appVersion, plus "-cuda" for GPU deployments. */}}
{{- define "anomalyd.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Paths of the files mounted from Secrets. */}}
{{- define "anomalyd.kafkaPasswordFile" -}}/var/run/secrets/kafka/password{{- end }}
{{- define "anomalyd.kafkaCaFile" -}}/var/run/secrets/kafka-ca/ca.crt{{- end }}
{{- define "anomalyd.kafkaClientDir" -}}/var/run/secrets/kafka-client{{- end }}

{{/* The daemon's config.yaml: .Values.config plus the paths of Secret-mounted files. Secrets that the configured
protocol would not use fail the install (the daemon would otherwise connect without logging in, or reject them). */}}
{{- define "anomalyd.config" -}}
{{- $sec := .Values.config.kafka.security }}
{{- $tls := or (eq $sec.protocol "SSL") (eq $sec.protocol "SASL_SSL") }}
{{- if and .Values.kafka.credentials.existingSecret (or (not (hasPrefix "SASL_" $sec.protocol)) (not $sec.sasl_mechanism)) }}
{{- fail (printf "kafka.credentials.existingSecret=%s needs a SASL login: set config.kafka.security.protocol to SASL_SSL or SASL_PLAINTEXT (it is %s) and config.kafka.security.sasl_mechanism to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (it is %s)" .Values.kafka.credentials.existingSecret $sec.protocol (toString (default "null" $sec.sasl_mechanism))) }}
{{- end }}
{{- if and .Values.kafka.credentials.existingSecret (not .Values.kafka.credentials.usernameKey) (not $sec.sasl_username) }}
{{- fail "kafka.credentials.usernameKey is empty (the user name is not in the Secret): set config.kafka.security.sasl_username" }}
{{- end }}
{{- range $name := list "caSecret" "clientSecret" }}
{{- if and (get $.Values.kafka.tls $name) (not $tls) }}
{{- fail (printf "kafka.tls.%s=%s needs TLS: set config.kafka.security.protocol to SSL or SASL_SSL (it is %s)" $name (get $.Values.kafka.tls $name) $sec.protocol) }}
{{- end }}
{{- end }}
{{- $cfg := deepCopy .Values.config }}
{{- if and (eq .Values.models.source "image") $cfg.models }}{{/* models baked into the image cannot appear later */}}
{{- $_ := set $cfg.models "wait_for_models_s" 0 }}
{{- end }}
{{- if $cfg.kafka.topic_pattern }}{{/* a pattern replaces the chart's default topics (the daemon refuses both) */}}
{{- $_ := unset $cfg.kafka "topics" }}
{{- end }}
{{- /* what the daemon checks across keys, refused here too rather than by every pod's start (exit 2) */}}
{{- $alerts := default dict $cfg.alerts }}
{{- if gt (int (default 3 $alerts.k)) (int (default 5 $alerts.n)) }}
{{- fail (printf "config.alerts.k (%v) must be <= config.alerts.n (%v)" (default 3 $alerts.k) (default 5 $alerts.n)) }}
{{- end }}
{{- if ge (int (default 3000 $cfg.kafka.heartbeat_interval_ms)) (int (default 10000 $cfg.kafka.session_timeout_ms)) }}
{{- fail (printf "config.kafka.heartbeat_interval_ms (%v) must be < config.kafka.session_timeout_ms (%v)" (default 3000 $cfg.kafka.heartbeat_interval_ms) (default 10000 $cfg.kafka.session_timeout_ms)) }}
{{- end }}
{{- $served := list }}{{/* a model served twice (the schema's uniqueItems sees whole entries, not names) */}}
{{- range (default list (default dict $cfg.models).served) }}
{{- if has .name $served }}
{{- fail (printf "config.models.served: model %q is served twice: each name must be served once" .name) }}
{{- end }}
{{- $served = append $served .name }}
{{- end }}
{{- $client := default "kafka-python" $cfg.kafka.client }}{{/* the fetch wait is bounded per client, below the schema's 300000 */}}
{{- $fetchMost := get (dict "kafka-python" 29999 "confluent" 59000) $client }}
{{- if and $fetchMost (gt (int (default 10 $cfg.kafka.fetch_max_wait_ms)) (int $fetchMost)) }}
{{- fail (printf "config.kafka.fetch_max_wait_ms (%v) must be <= %v with config.kafka.client %s (%s)" $cfg.kafka.fetch_max_wait_ms $fetchMost $client (ternary "kafka-python refuses its request_timeout_ms, 30000, or more" "librdkafka's fetches time out past its socket.timeout.ms, 60000, less a second" (eq $client "kafka-python"))) }}
{{- end }}
{{- if .Values.kafka.credentials.existingSecret }}
{{- $_ := set $cfg.kafka.security "sasl_password_file" (include "anomalyd.kafkaPasswordFile" .) }}
{{- $_ := set $cfg.kafka.security "sasl_password" nil }}
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
{{- $_ := set $cfg.kafka.security "ssl_cafile" (include "anomalyd.kafkaCaFile" .) }}
{{- end }}
{{- if .Values.kafka.tls.clientSecret }}
{{- $_ := set $cfg.kafka.security "ssl_certfile" (printf "%s/tls.crt" (include "anomalyd.kafkaClientDir" .)) }}
{{- $_ := set $cfg.kafka.security "ssl_keyfile" (printf "%s/tls.key" (include "anomalyd.kafkaClientDir" .)) }}
{{- if .Values.kafka.tls.clientKeyPasswordKey }}
{{- $_ := set $cfg.kafka.security "ssl_key_password_file" (printf "%s/key-password" (include "anomalyd.kafkaClientDir" .)) }}
{{- $_ := set $cfg.kafka.security "ssl_key_password" nil }}
{{- end }}
{{- end }}
{{- range $name, $how := dict "sasl_password" "put it in a Secret named by kafka.credentials.existingSecret" "ssl_key_password" "put it in the client Secret and name its key in kafka.tls.clientKeyPasswordKey" }}
{{- if get $cfg.kafka.security $name }}
{{- fail (printf "config.kafka.security.%s would be written into a ConfigMap, readable by anyone who can read the namespace's ConfigMaps: %s" $name $how) }}
{{- end }}
{{- end }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString (dig "sinks" "alertmanager" "url" "" $cfg)) }}
{{- fail "config.sinks.alertmanager.url holds credentials, which would be written into a ConfigMap: give the URL from a Secret instead, with extraEnv: [{name: ANOMALYD_SINKS__ALERTMANAGER__URL, valueFrom: {secretKeyRef: {name: ..., key: url}}}]" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The container's environment, volume mounts and the pod's volumes: the daemon and its `helm test` pod. */}}
{{- define "anomalyd.env" -}}
- name: HOME
  value: /tmp
- name: ANOMALYD_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
{{- if and .Values.kafka.credentials.existingSecret .Values.kafka.credentials.usernameKey }}
- name: ANOMALYD_KAFKA__SECURITY__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.credentials.existingSecret }}
      key: {{ .Values.kafka.credentials.usernameKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{- define "anomalyd.volumeMounts" -}}
- name: config
  mountPath: /etc/anomalyd
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if eq .Values.models.source "pvc" }}
- name: models
  mountPath: {{ .Values.config.models.dir }}
  readOnly: true
{{- end }}
{{- if .Values.kafka.credentials.existingSecret }}
- name: kafka-credentials
  mountPath: /var/run/secrets/kafka
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /var/run/secrets/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientSecret }}
- name: kafka-client
  mountPath: {{ include "anomalyd.kafkaClientDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "anomalyd.volumes" -}}
- name: config
  configMap:
    name: {{ include "anomalyd.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if eq .Values.models.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim | default (printf "%s-models" (include "anomalyd.fullname" .)) }}
    readOnly: true
{{- end }}
{{- if .Values.kafka.credentials.existingSecret }}
- name: kafka-credentials
  secret:
    secretName: {{ .Values.kafka.credentials.existingSecret }}
    items:
      - key: {{ .Values.kafka.credentials.passwordKey }}
        path: password
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items:
      - key: {{ .Values.kafka.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if .Values.kafka.tls.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.tls.clientSecret }}
    items:
      - key: {{ .Values.kafka.tls.clientCertKey }}
        path: tls.crt
      - key: {{ .Values.kafka.tls.clientKeyKey }}
        path: tls.key
      {{- if .Values.kafka.tls.clientKeyPasswordKey }}
      - key: {{ .Values.kafka.tls.clientKeyPasswordKey }}
        path: key-password
      {{- end }}
{{- end }}
{{- end }}
