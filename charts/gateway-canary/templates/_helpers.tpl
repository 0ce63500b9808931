{{/* Names and labels. */}}
{{- define "gateway-canary.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gateway-canary.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gateway-canary.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gateway-canary.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gateway-canary.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gateway-canary.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "gateway-canary.fullname" .)) .Values.existingConfigMap -}}
{{- end -}}

{{/* A policy's Service reference ("ns/name" or {namespace, name}) as "ns/name". */}}
{{- define "gateway-canary.ref" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ printf "%s/%s" .namespace .name }}{{- end -}}
{{- end -}}

{{/*
What the controller needs, as JSON: {"services": {ns: [names]}, "events": [ns], "states": [policy]}.
The same rules as `gateway-canary rbac` (controller/rbac.py); tests/test_chart.py compares the two.
*/}}
{{- define "gateway-canary.access" -}}
{{- $services := dict -}}
{{- $events := dict -}}
{{- $states := list -}}
{{- range $file, $raw := .Values.policies -}}
{{- $policy := include "gateway-canary.policy" $raw | fromYaml -}}
{{- $states = append $states $policy.metadata.name -}}
{{- range $role := list "target" "source" -}}
{{- $ref := include "gateway-canary.ref" (get (get $policy.spec $role) "service") | splitList "/" -}}
{{- $_ := set $services (index $ref 0) (append (get $services (index $ref 0) | default list) (index $ref 1)) -}}
{{- if eq $role "target" }}{{ $_ := set $events (index $ref 0) true }}{{ end -}}
{{- end -}}
{{- end -}}
{{- range .Values.rbac.services -}}
{{- $ref := splitList "/" . -}}
{{- $_ := set $services (index $ref 0) (append (get $services (index $ref 0) | default list) (index $ref 1)) -}}
{{- end -}}
{{- range .Values.rbac.targets -}}
{{- $_ := set $events (index (splitList "/" .) 0) true -}}
{{- end -}}
{{- range .Values.rbac.policyNames -}}
{{- $states = append $states . -}}
{{- end -}}
{{- dict "services" $services "events" (keys $events | sortAlpha) "states" ($states | uniq | sortAlpha) | toJson -}}
{{- end -}}

{{/* A policy given as YAML text or as a mapping, as a mapping (rendered as YAML, to be read back). */}}
{{- define "gateway-canary.policy" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toYaml . }}{{- end -}}
{{- end -}}
