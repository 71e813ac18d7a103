{{- define "agent.labels" -}}
app.kubernetes.io/name: tether-agent
app.kubernetes.io/part-of: tether
{{- end }}

{{- define "agent.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "agent.secretName" -}}
{{ .Values.credentials.existingSecret | default "tether-agent" }}
{{- end }}


{{- /* The port of an http(s):// or ws(s):// URL. */}}
{{- define "agent.urlPort" -}}
{{- $authority := regexReplaceAll "^[a-z]+://([^/]+).*$" . "${1}" -}}
{{- if regexMatch ":[0-9]+$" $authority -}}
{{ regexReplaceAll "^.*:([0-9]+)$" $authority "${1}" }}
{{- else if or (hasPrefix "ws://" .) (hasPrefix "http://" .) -}}
80
{{- else -}}
443
{{- end -}}
{{- end }}

{{- /* "true" when the agent goes through the proxy: one is set and
tether-server's host is not in noProxy. Names and exact addresses are
matched as the agent matches them; CIDR entries are not (the operator's
bundle matches those too). */}}
{{- define "agent.proxied" -}}
{{- if .Values.proxy.url -}}
{{- $host := regexReplaceAll "^wss?://\\[?([^/\\]]+?)\\]?(:[0-9]+)?(/.*)?$" .Values.serverUrl "${1}" | lower -}}
{{- $port := include "agent.urlPort" .Values.serverUrl -}}
{{- $direct := false -}}
{{- range .Values.proxy.noProxy -}}
{{- $raw := lower . -}}
{{- $entry := regexReplaceAll ":[0-9]+$" $raw "" | trimPrefix "*" -}}
{{- $portOk := or (not (regexMatch ":[0-9]+$" $raw)) (hasSuffix (printf ":%s" $port) $raw) -}}
{{- $nameOk := or (eq $entry $host) (and (hasPrefix "." $entry) (hasSuffix $entry $host)) (and (not (hasPrefix "." $entry)) (hasSuffix (printf ".%s" $entry) $host)) -}}
{{- if or (eq $raw "*") (and $portOk $nameOk) -}}
{{- $direct = true -}}
{{- end -}}
{{- end -}}
{{- if not $direct -}}true{{- end -}}
{{- end -}}
{{- end }}
