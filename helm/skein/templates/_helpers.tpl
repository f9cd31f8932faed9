{{- define "skein.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "skein.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "skein.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "skein.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- /* The labels that select the nodes (Services, PodDisruptionBudget, spreading). */ -}}
{{- define "skein.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skein.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /*
The label every pod of this release carries, the nodes and the `helm test` pods alike: the
NetworkPolicy lets these pods reach the gRPC and gossip ports.
*/ -}}
{{- define "skein.releaseLabel" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The headless Service: stable pod DNS names, and the seed of the peers and of gossip. */ -}}
{{- define "skein.headlessName" -}}
{{- printf "%s-headless" (include "skein.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* The DNS domain of the pods: <headless>.<namespace>.svc.<clusterDomain>. */ -}}
{{- define "skein.domain" -}}
{{- printf "%s.%s.svc.%s" (include "skein.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "skein.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "skein.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* The Secret holding the admin token: the one named by adminTokenSecret, or the chart's own. */ -}}
{{- define "skein.adminTokenSecretName" -}}
{{- if .Values.adminTokenSecret -}}
{{- .Values.adminTokenSecret -}}
{{- else -}}
{{- printf "%s-admin" (include "skein.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "skein.adminTokenSecretKey" -}}
{{- if .Values.adminTokenSecret -}}
{{- default "token" .Values.adminTokenSecretKey -}}
{{- else -}}
token
{{- end -}}
{{- end -}}

{{- /* The scheme of the gRPC port, for the CLI. */ -}}
{{- define "skein.grpcScheme" -}}
{{- if .Values.grpcTls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- /* Fails the render on combinations the schema cannot express. */ -}}
{{- define "skein.validate" -}}
{{- if and .Values.grpcTls.enabled (not .Values.grpcTls.secretName) -}}
{{- fail "grpcTls.enabled needs grpcTls.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" -}}
{{- end -}}
{{- end -}}

{{- /*
The labels of the `helm test` pods: the release label (the NetworkPolicy lets them reach the
gRPC port) but not app.kubernetes.io/name, so that no Service selects them.
*/ -}}
{{- define "skein.testLabels" -}}
{{ include "skein.releaseLabel" . }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- /* The pod spec shared by the `helm test` pods, up to the container's args. */ -}}
{{- define "skein.testPodSpec" -}}
restartPolicy: Never
serviceAccountName: {{ include "skein.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.grpcTls.enabled }}
volumes:
  - name: grpc-tls
    secret:
      secretName: {{ .Values.grpcTls.secretName }}
      defaultMode: 0440
{{- end }}
{{- end -}}

{{- /* The container of a `helm test` pod, without its args. */ -}}
{{- define "skein.testContainer" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: SKEIN_ADMIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "skein.adminTokenSecretName" . }}
        key: {{ include "skein.adminTokenSecretKey" . }}
resources:
  requests: {cpu: 10m, memory: 16Mi}
  limits: {memory: 64Mi}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- if .Values.grpcTls.enabled }}
volumeMounts:
  - name: grpc-tls
    mountPath: /etc/skein-tls
    readOnly: true
{{- end }}
{{- end -}}
