{{/*
The labels of every object: kustomize's (deploy/base) and Helm's own.
*/}}
{{- define "qoscni.labels" -}}
app.kubernetes.io/part-of: qoscni
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
The ceilings as install's --ceilings takes them: key=value, by key.
*/}}
{{- define "qoscni.ceilings" -}}
{{- $kv := list -}}
{{- range $k, $v := .Values.ceilings -}}
{{- if kindIs "string" $v -}}
{{- $kv = append $kv (printf "%s=%s" $k $v) -}}
{{- else -}}
{{- $kv = append $kv (printf "%s=%d" $k (int64 $v)) -}}
{{- end -}}
{{- end -}}
{{- join "," $kv -}}
{{- end }}

{{/*
networkPolicy.enabled, true where a release's values predate it (an
upgrade with --reuse-values keeps the old values without the chart's new
defaults).
*/}}
{{- define "qoscni.networkPolicy" -}}
{{- $np := .Values.networkPolicy | default dict -}}
{{- if hasKey $np "enabled" }}{{ $np.enabled }}{{ else }}true{{ end -}}
{{- end }}

{{/*
The data of the network config's ConfigMap, as JSON: the keys of
deploy/base's configMapGenerator.
*/}}
{{- define "qoscni.configData" -}}
{{- dict
  "standalone.json" (.Files.Get "files/standalone.json")
  "chained.json" (.Files.Get "files/chained.json")
  "mode" .Values.mode
  "primary" .Values.primary
  "nodeCapacity" .Values.nodeCapacity
  "ceilings" (include "qoscni.ceilings" .)
  "networkPolicy" (ternary "k8s" "off" (include "qoscni.networkPolicy" . | eq "true"))
  | toJson -}}
{{- end }}

{{/*
The ConfigMap's name with kustomize's content hash, so that both name the
same config alike: the sha256 of {"data", "kind", "name"} as JSON, its
first 10 hex digits with 0 1 3 a e spelt g h k m t. ("name" is empty:
kustomize looks up "metadata/name" as one key, api v0.21.2 hasher.go.) A
new network config is a new name, which rolls the DaemonSet and so re-runs
the install.
*/}}
{{- define "qoscni.configName" -}}
{{- $data := include "qoscni.configData" . | fromJson -}}
{{- $h := dict "kind" "ConfigMap" "name" "" "data" $data | toJson | sha256sum | trunc 10 -}}
{{- $h = $h | replace "0" "g" | replace "1" "h" | replace "3" "k" | replace "a" "m" | replace "e" "t" -}}
qoscni-config-{{ $h }}
{{- end }}

{{/*
The objects of a manifest file the kustomize manifests use too (files/
links to them): each document with the chart's labels, in the release's
namespace when namespaced. Argument: list root file namespaced extraLabels.
*/}}
{{- define "qoscni.fromFile" -}}
{{- $root := index . 0 -}}
{{- $file := index . 1 -}}
{{- $namespaced := index . 2 -}}
{{- $extra := index . 3 -}}
{{- range $doc := regexSplit "(?m)^---[ \t]*$" ($root.Files.Get $file) -1 }}
{{- $o := fromYaml $doc }}
{{- if $o.kind }}
{{- $md := $o.metadata }}
{{- $_ := set $md "labels" (merge (dict) (include "qoscni.labels" $root | fromYaml) $extra ($md.labels | default dict)) }}
{{- if $namespaced }}
{{- $_ := set $md "namespace" $root.Release.Namespace }}
{{- end }}
---
{{ toYaml $o }}
{{- end }}
{{- end }}
{{- end }}
