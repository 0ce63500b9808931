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
What the controller needs, as JSON: {"services": {ns: [names]} (get, patch), "readonly": {ns: [names]}
(get: a target written through its IstioGateway), "istiogateways": {ns: [names]}, "events": [ns] (our
own Events, beside the targets), "watched": [ns] (the cloud's Events and the EndpointSlices of every
gateway namespace), "states": [policy], "routes": bool (list Istio Gateways cluster-wide)}.
The same rules as `gateway-canary rbac` (controller/rbac.py); tests/test_chart.py compares the two.
*/}}
{{- define "gateway-canary.access" -}}
{{- $services := dict -}}
{{- $readonly := dict -}}
{{- $istio := dict -}}
{{- $events := dict -}}
{{- $watched := dict -}}
{{- $states := list -}}
{{- $routes := false -}}
{{- range $file, $raw := .Values.policies -}}
{{- $policy := include "gateway-canary.policy" $raw | fromYaml -}}
{{- $states = append $states $policy.metadata.name -}}
{{- $routeSpec := get $policy.spec "routes" | default dict -}}
{{- if or (not (hasKey $routeSpec "check")) $routeSpec.check }}{{ $routes = true }}{{ end -}}
{{- range $role := list "target" "source" -}}
{{- $gateway := get $policy.spec $role -}}
{{- $ref := include "gateway-canary.ref" $gateway.service | splitList "/" -}}
{{- $ns := index $ref 0 -}}
{{- $_ := set $watched $ns true -}}
{{- if and (eq $role "target") (hasKey $gateway "istioGateway") -}}
{{- $_ := set $readonly $ns (append (get $readonly $ns | default list) (index $ref 1)) -}}
{{- $ig := include "gateway-canary.ref" $gateway.istioGateway | splitList "/" -}}
{{- $_ := set $istio (index $ig 0) (append (get $istio (index $ig 0) | default list) (index $ig 1)) -}}
{{- else -}}
{{- $_ := set $services $ns (append (get $services $ns | default list) (index $ref 1)) -}}
{{- end -}}
{{- if eq $role "target" }}{{ $_ := set $events $ns true }}{{ end -}}
{{- end -}}
{{- end -}}
{{- range .Values.rbac.services -}}
{{- $ref := splitList "/" . -}}
{{- $_ := set $services (index $ref 0) (append (get $services (index $ref 0) | default list) (index $ref 1)) -}}
{{- $_ := set $watched (index $ref 0) true -}}
{{- end -}}
{{- range .Values.rbac.targets -}}
{{- $_ := set $events (index (splitList "/" .) 0) true -}}
{{- end -}}
{{- range .Values.rbac.policyNames -}}
{{- $states = append $states . -}}
{{- end -}}
{{- if and .Values.rbac.policyNames .Values.rbac.routeParity }}{{ $routes = true }}{{ end -}}
{{- $access := dict "services" $services "readonly" $readonly "istiogateways" $istio "events" (keys $events | sortAlpha) -}}
{{- $_ := set $access "watched" (keys $watched | sortAlpha) -}}
{{- $_ := set $access "states" ($states | uniq | sortAlpha) -}}
{{- $_ := set $access "routes" $routes -}}
{{- $access | toJson -}}
{{- end -}}

{{/* A policy given as YAML text or as a mapping, as a mapping (rendered as YAML, to be read back). */}}
{{- define "gateway-canary.policy" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toYaml . }}{{- end -}}
{{- end -}}

{{/*
The leaderElection values as JSON, each missing key filled with its default (the same as in
values.yaml; tests/test_chart.py compares them). `helm upgrade --reuse-values` from a chart without
leader election reuses that chart's values, which have no leaderElection block at all.
*/}}
{{- define "gateway-canary.election" -}}
{{- $election := dict "enabled" true "leaseName" "" "leaseDuration" 15 "renewDeadline" 10 "retryPeriod" 2 -}}
{{- range $key, $value := .Values.leaderElection | default dict }}{{ $_ := set $election $key $value }}{{ end -}}
{{- $election | toJson -}}
{{- end -}}

{{/* The Lease the replicas elect a leader with (in the release's namespace). */}}
{{- define "gateway-canary.leaseName" -}}
{{- default (include "gateway-canary.fullname" .) (include "gateway-canary.election" . | fromJson).leaseName -}}
{{- end -}}

{{/*
Fails the render on leader-election values the schema cannot check: the order of the three timings
(the controller refuses to start otherwise: GATEWAY_CANARY_RENEW_DEADLINE_SECONDS and friends), and
settings that would bypass or break `leaderElection`. Renders nothing.
*/}}
{{- define "gateway-canary.checkLeaderElection" -}}
{{- $election := include "gateway-canary.election" . | fromJson -}}
{{- with $election -}}
{{- if ge (float64 .renewDeadline) (float64 .leaseDuration) -}}
{{- fail (printf "leaderElection.renewDeadline (%v) must be less than leaderElection.leaseDuration (%v): the leader must stop writing before a standby may take the Lease over" .renewDeadline .leaseDuration) -}}
{{- end -}}
{{- if ge (float64 .retryPeriod) (float64 .renewDeadline) -}}
{{- fail (printf "leaderElection.retryPeriod (%v) must be less than leaderElection.renewDeadline (%v): the leader must get several tries at renewing before it stops" .retryPeriod .renewDeadline) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "LEADER_ELECTION" "LEASE_NAME" "LEASE_DURATION_SECONDS" "RENEW_DEADLINE_SECONDS" "RETRY_PERIOD_SECONDS" -}}
{{- if hasKey $.Values.settings $key -}}
{{- fail (printf "settings.%s: set it with the leaderElection values (the chart renders GATEWAY_CANARY_%s from them)" $key $key) -}}
{{- end -}}
{{- end -}}
{{- if and $election.enabled (hasKey .Values.settings "IDENTITY") -}}
{{- fail "settings.IDENTITY: every replica would claim the Lease under the same name (two leaders); leave it unset, each process then names itself after its pod" -}}
{{- end -}}
{{- end -}}
