{{/* Names, labels and the pieces several templates share. */}}

{{- define "chunkfs-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object: the release name, plus the chart name unless it contains it. */}}
{{- define "chunkfs-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chunkfs-csi.labels" -}}
app.kubernetes.io/name: {{ include "chunkfs-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "node"). */}}
{{- define "chunkfs-csi.selector" -}}
app.kubernetes.io/name: {{ include "chunkfs-csi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "chunkfs-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The directory of the node plugin's socket, as kubelet knows it. */}}
{{- define "chunkfs-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{- define "chunkfs-csi.mounterSocket" -}}
/run/chunkfs-mounter/mounter.sock
{{- end -}}

{{/* --metrics-address for a port, or nothing when metrics are off. */}}
{{- define "chunkfs-csi.metricsArg" -}}
{{- if eq .root.Values.metrics.expose "loopback" }}
- --metrics-address=127.0.0.1:{{ .port }}
{{- else if eq .root.Values.metrics.expose "podIP" }}
- --metrics-address=$(POD_IP):{{ .port }}
{{- end }}
{{- end -}}

{{/* The default backend of a plugin: env from the backend Secret (every key optional:
     the CSI secrets of each request can name another backend). */}}
{{- define "chunkfs-csi.backendEnv" -}}
{{- $secret := .Values.backend.secretName -}}
{{- range $env, $key := dict "CHUNKFS_META" "meta-url" "CHUNKFS_STORAGE" "storage" "AWS_ENDPOINT_URL" "endpoint" "AWS_REGION" "region" "AWS_ACCESS_KEY_ID" "access-key-id" "AWS_SECRET_ACCESS_KEY" "secret-access-key" }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end -}}

{{/* The securityContext of a container that needs no privilege at all. */}}
{{- define "chunkfs-csi.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* A container that mounts filesystems and makes mounts propagate to the host:
     Kubernetes allows Bidirectional propagation only to privileged containers. */}}
{{- define "chunkfs-csi.mounting" -}}
privileged: true
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
readOnlyRootFilesystem: true
capabilities:
  add: [SYS_ADMIN]
{{- end -}}
