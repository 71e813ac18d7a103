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

{{- define "agent.serverPort" -}}
{{- $authority := regexReplaceAll "^wss?://([^/]+).*$" .Values.serverUrl "${1}" -}}
{{- if regexMatch ":[0-9]+$" $authority -}}
{{ regexReplaceAll "^.*:([0-9]+)$" $authority "${1}" }}
{{- else if hasPrefix "ws://" .Values.serverUrl -}}
80
{{- else -}}
443
{{- end -}}
{{- end }}
