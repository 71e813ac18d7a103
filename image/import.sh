#!/usr/bin/env bash
# Loads tether's image archive (make image) into the containerd that
# ../shared/tools/realk8s-node-up runs, in the namespace the kubelet uses, so
# pods run it with imagePullPolicy: Never (or IfNotPresent).
# Usage: image/import.sh ARCHIVE IMAGE_NAME
# The socket is found as realk8s-image-import finds it: $REALK8S_CONTAINERD_SOCK,
# else $REALK8S_NODE_DIR/containerd/containerd.sock (REALK8S_NODE_DIR defaults
# to ${REALK8S_DIR:-/tmp/realk8s}-node).
set -euo pipefail
archive=$1 name=$2
node_dir=${REALK8S_NODE_DIR:-${REALK8S_DIR:-/tmp/realk8s}-node}
sock=${REALK8S_CONTAINERD_SOCK:-$node_dir/containerd/containerd.sock}
[[ -f $archive ]] || { echo "image-import: no archive at $archive (run make image)" >&2; exit 1; }
command -v ctr >/dev/null || { echo "image-import: ctr not found (apt-get install containerd)" >&2; exit 1; }
[[ -S $sock ]] || { echo "image-import: no containerd socket at $sock (is realk8s-node-up running?)" >&2; exit 1; }
ctr --address "$sock" -n k8s.io images import "$archive"
ctr --address "$sock" -n k8s.io images ls "name==$name"
