#!/usr/bin/env bash
# Run every experiment of a profile (faithful | quick | smoke), resumable, then write
# outputs/REPRODUCTION.md. Extra arguments go to every sweep, e.g. seeds=1.
set -euo pipefail
exec python -m dipddpm.reproduce "${1:-quick}" "${@:2}"
