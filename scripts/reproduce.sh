#!/usr/bin/env bash
# Run every report table's sweep of a profile that is not finished (default: standard) into the
# committed folder outputs/reproduction/<profile>/, then regenerate the tables and
# docs/REPRODUCTION.md. Up to date: only the regeneration, in seconds. Extra arguments go to
# dipddpm-reproduce, e.g. --only staged/levels_1000, --report-only, or overrides such as seeds=1.
set -euo pipefail
exec python -m dipddpm.reproduce "${1:-standard}" "${@:2}"
