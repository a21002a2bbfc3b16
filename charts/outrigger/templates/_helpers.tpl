{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "outrigger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, plus the chart name unless the release name contains it.
The Service, the MutatingWebhookConfiguration and the TLS Secret are named from it.
*/}}
{{- define "outrigger.fullname" -}}
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

{{- define "outrigger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outrigger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outrigger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outrigger.labels" -}}
helm.sh/chart: {{ include "outrigger.chart" . }}
{{ include "outrigger.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outrigger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outrigger.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "outrigger.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Service's DNS names, which the serving certificate must carry. */}}
{{- define "outrigger.serviceDNSNames" -}}
{{- $svc := include "outrigger.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/* The Secret the serving pair is read from (tls.crt, tls.key), per tls.mode; in self mode
the one the webhook keeps itself (a name of its own: never a Secret Helm manages). */}}
{{- define "outrigger.tlsSecretName" -}}
{{- if eq .Values.tls.mode "self" }}
{{- printf "%s-self-tls" (include "outrigger.fullname" .) }}
{{- else if eq .Values.tls.mode "secret" }}
{{- required "tls.existingSecret is required when tls.mode=secret: the Secret holding tls.crt and tls.key" .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "outrigger.fullname" .) }}
{{- end }}
{{- end }}

{{/* cert-manager mode: the serving Certificate, the CA issuer and the bootstrap issuer. */}}
{{- define "outrigger.certificateName" -}}
{{- printf "%s-serving" (include "outrigger.fullname" .) }}
{{- end }}

{{/* The policy ConfigMap's policy.yaml: a YAML string as given, or a map rendered as YAML. */}}
{{- define "outrigger.policy" -}}
{{- if and .Values.openshift.enabled .Values.openshift.policy }}
{{- .Files.Get "files/openshift-policy.yaml" }}
{{- else if kindIs "string" .Values.policy }}
{{- .Values.policy }}
{{- else }}
{{- toYaml .Values.policy }}
{{- end }}
{{- end }}

{{/*
"true" when the webhook keeps the policy compiled into the API server (matchConditions, the
guard), "" otherwise: then it needs the API, and the ClusterRole below.
*/}}
{{- define "outrigger.compiledPolicy" -}}
{{- if or .Values.compiledPolicy.matchConditions (ne .Values.compiledPolicy.guard "Off") -}}
true
{{- end -}}
{{- end }}
