{{- define "shoal.name" -}}shoal{{- end -}}
{{/* "shoal" for a release named shoal (or shoal-something), else "<release>-shoal". */}}
{{- define "shoal.fullname" -}}
{{- if contains "shoal" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-shoal" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- define "shoal.labels" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "shoal.selector" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "shoal.serviceAccountSubject" -}}
- kind: ServiceAccount
  name: {{ include "shoal.fullname" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/*
The operator's rules on the objects it watches, for a ClusterRole (all namespaces) or a Role
(watchNamespace). Exactly what the code calls today; docs/operate.md says why each is there.
Grow this list when a controller lands, never ahead of it.
*/}}
{{- define "shoal.watchedRules" -}}
# Sharded watches and the leader's labeller read every shoal kind and set its shard label.
- apiGroups: ["shoal.dev"]
  resources: ["workflows", "activities", "activityworkers", "tasks", "ignitors", "namespacemanagers"]
  verbs: ["list", "watch", "patch"]
# The Workflow controller records progress (merge patch with a resourceVersion precondition).
- apiGroups: ["shoal.dev"]
  resources: ["workflows/status"]
  verbs: ["patch"]
# Garbage collection deletes a workflow whose ttlStrategy ran out (with a UID precondition;
# its Jobs and pods go with it by ownerReference).
- apiGroups: ["shoal.dev"]
  resources: ["workflows"]
  verbs: ["delete"]
# The Activity controller creates an Activity's workers (a worker is deleted with its
# Activity by the garbage collector, so there is no delete); the Activity and ActivityWorker
# controllers read their objects and record their status (merge patch with a
# resourceVersion precondition). list, watch and patch are in the first rule.
- apiGroups: ["shoal.dev"]
  resources: ["activities", "activityworkers"]
  verbs: ["get"]
- apiGroups: ["shoal.dev"]
  resources: ["activityworkers"]
  verbs: ["create"]
- apiGroups: ["shoal.dev"]
  resources: ["activities/status", "activityworkers/status"]
  verbs: ["get", "patch"]
# Steps and ActivityWorkers run as Jobs: watched per shard, read when not cached, created,
# labels cascaded and shard labels fixed (patch), cancelled steps' Jobs and garbage
# collection's deleted, an old spec's Jobs deleted server-side by label (deletecollection).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]
# A finished step's output is its pod's termination message; a NamespaceManager's
# PODS_SUCCEED condition lists the pods it watches. With `executor: Pod` a step attempt is a
# bare pod: watched per shard, read when not cached, created, labels cascaded and shard
# labels fixed (patch), cancelled steps' pods and garbage collection's deleted, an old spec's
# pods deleted server-side by label (deletecollection).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]
# Events about workflows and their steps, and about namespace managers (kube's Recorder:
# create, then patch a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The NamespaceManager controller reads a manager, deactivates it (a patch of
# spec.deactivated; list, watch and patch are in the first rule) and records its status.
- apiGroups: ["shoal.dev"]
  resources: ["namespacemanagers"]
  verbs: ["get"]
- apiGroups: ["shoal.dev"]
  resources: ["namespacemanagers/status"]
  verbs: ["get", "patch"]
# SCALE_DOWN lists the workloads and scales each with one patch of spec.replicas and the
# shoal.dev/original-replicas annotation (not the scale subresource: the count recorded and
# the scale-down are one write).
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "patch"]
# A WEBHOOK action's signing secret, the one Secret its manager names (no list or watch).
# Cluster-wide, this also covers an ActionPlugin's signing secret in the release namespace.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The Task and Ignitor controllers read one object by name and record its status (merge
# patch with a resourceVersion precondition): an Ignitor's firings, a Task's runs, trigger
# cursors and deliveries. list, watch and patch are in the first rule. A Task's runs use the
# Job, pod and Event rules above.
- apiGroups: ["shoal.dev"]
  resources: ["tasks", "ignitors"]
  verbs: ["get"]
- apiGroups: ["shoal.dev"]
  resources: ["tasks/status", "ignitors/status"]
  verbs: ["patch"]
{{- end -}}

{{/*
ActionPlugins are cluster-scoped: this rule is for a ClusterRole, whatever watchNamespace
says.
*/}}
{{- define "shoal.actionPluginRules" -}}
# The Task controller reads the ActionPlugins that successActions and failureActions name
# (url, secretRef, timeout, attempts). It never writes them: only cluster admins do.
- apiGroups: ["shoal.dev"]
  resources: ["actionplugins"]
  verbs: ["get", "list", "watch"]
{{- end -}}

{{/*
Namespaces are cluster-scoped: this rule is for a ClusterRole, and with watchNamespace it
names that namespace only.
*/}}
{{- define "shoal.namespaceRules" -}}
# The NamespaceManager controller reads the namespace it manages (creation time, the
# shoal.dev/managed-from opt-in label) and deletes it for a DELETE action.
- apiGroups: [""]
  resources: ["namespaces"]
  {{- with .Values.watchNamespace }}
  resourceNames: [{{ . | quote }}]
  {{- end }}
  verbs: ["get", "delete"]
{{- end -}}

{{/* `shoal run` checks at start that every shoal CRD is installed (by name). */}}
{{- define "shoal.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["actionplugins.shoal.dev", "activities.shoal.dev", "activityworkers.shoal.dev", "ignitors.shoal.dev", "namespacemanagers.shoal.dev", "tasks.shoal.dev", "workflows.shoal.dev"]
  verbs: ["get"]
{{- end -}}

{{- define "shoal.kinds" -}}["workflows", "activities", "activityworkers", "tasks", "ignitors", "namespacemanagers"]{{- end -}}
{{- define "shoal.statuses" -}}["workflows/status", "activities/status", "activityworkers/status", "tasks/status", "ignitors/status", "namespacemanagers/status"]{{- end -}}

{{- define "shoal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A duration as `shoal run` reads it (500ms, 15s, 2m, or a bare number of seconds), in
milliseconds. The schema has already checked its shape. */}}
{{- define "shoal.ms" -}}
{{- $d := toString . -}}
{{- if hasSuffix "ms" $d -}}{{ trimSuffix "ms" $d | float64 }}
{{- else if hasSuffix "m" $d -}}{{ mulf (trimSuffix "m" $d | float64) 60000 }}
{{- else -}}{{ mulf (trimSuffix "s" $d | float64) 1000 }}
{{- end -}}
{{- end -}}

{{/*
What the schema cannot say, because it compares two values: the checks `shoal run` makes at
start (HaConfig::validate), and a grace period that leaves time for a graceful handover.
*/}}
{{- define "shoal.validate" -}}
{{- $lease := include "shoal.ms" .Values.leaseDuration | float64 -}}
{{- $renew := include "shoal.ms" .Values.renewDeadline | float64 -}}
{{- $retry := include "shoal.ms" .Values.retryPeriod | float64 -}}
{{- if or (lt $lease 1000.0) (ne (mod (int64 $lease) 1000) 0) -}}
{{- fail (printf "leaseDuration %v: a Lease holds whole seconds, at least 1s" .Values.leaseDuration) -}}
{{- end -}}
{{- if ge $renew $lease -}}
{{- fail (printf "renewDeadline %v must be shorter than leaseDuration %v" .Values.renewDeadline .Values.leaseDuration) -}}
{{- end -}}
{{- if or (le $retry 0.0) (ge $retry $renew) -}}
{{- fail (printf "retryPeriod %v must be above zero and shorter than renewDeadline %v" .Values.retryPeriod .Values.renewDeadline) -}}
{{- end -}}
{{- if lt (mulf .Values.terminationGracePeriodSeconds 1000) (addf $renew 5000) -}}
{{- fail (printf "terminationGracePeriodSeconds %v leaves no time for a graceful handover: a replica drains for up to renewDeadline (%v), then writes its Leases; give it at least renewDeadline + 5s" .Values.terminationGracePeriodSeconds .Values.renewDeadline) -}}
{{- end -}}
{{- end -}}

{{/* The label selector of the alerts' series. */}}
{{- define "shoal.alertSelector" -}}
{{- .Values.metrics.prometheusRule.selector | default (printf "job=%q,namespace=%q" (printf "%s-metrics" (include "shoal.fullname" .)) .Release.Namespace) -}}
{{- end -}}
