{{- define "skein.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "skein.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "skein.labels" -}}
app.kubernetes.io/name: {{ include "skein.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "skein.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skein.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The headless Service: stable pod DNS names, and the gossip seed. */ -}}
{{- define "skein.headlessName" -}}
{{- printf "%s-headless" (include "skein.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* The DNS domain of the pods: <headless>.<namespace>.svc.<clusterDomain>. */ -}}
{{- define "skein.domain" -}}
{{- printf "%s.%s.svc.%s" (include "skein.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- /*
The number of Raft voters: cluster.voters (odd, at least 1), or replicaCount when there are
fewer pods than that. The pods with ordinals 0 .. voters-1 are the voters.
*/ -}}
{{- define "skein.voterCount" -}}
{{- $voters := int .Values.cluster.voters -}}
{{- if or (lt $voters 1) (eq (mod $voters 2) 0) -}}
{{- fail (printf "cluster.voters must be an odd number, at least 1 (got %d)" $voters) -}}
{{- end -}}
{{- $replicas := int .Values.replicaCount -}}
{{- if lt $replicas $voters -}}
{{- $voters = $replicas -}}
{{- end -}}
{{- $voters -}}
{{- end -}}

{{- /*
--voters: `id=host:port` for each voter, comma-separated: pod <fullname>-<i> is node i+1, at
its gRPC port under the headless Service. Every pod gets the same list.
*/ -}}
{{- define "skein.voters" -}}
{{- $fullname := include "skein.fullname" . -}}
{{- $domain := include "skein.domain" . -}}
{{- $port := int .Values.service.grpcPort -}}
{{- $voters := list -}}
{{- range $i := until (int (include "skein.voterCount" .)) -}}
{{- $voters = append $voters (printf "%d=%s-%d.%s:%d" (add1 $i) $fullname $i $domain $port) -}}
{{- end -}}
{{- join "," $voters -}}
{{- end -}}

{{- /*
--peers: the voters' gRPC addresses (`host:port`, comma-separated). A pod that is not a voter
joins the cluster as a learner through them.
*/ -}}
{{- define "skein.peers" -}}
{{- $fullname := include "skein.fullname" . -}}
{{- $domain := include "skein.domain" . -}}
{{- $port := int .Values.service.grpcPort -}}
{{- $peers := list -}}
{{- range $i := until (int (include "skein.voterCount" .)) -}}
{{- $peers = append $peers (printf "%s-%d.%s:%d" $fullname $i $domain $port) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}
