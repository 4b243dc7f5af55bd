#!/usr/bin/env bash
# The working tree for a GPU lease through the device tool, whose every call carries the tree
# and one part of the GPU kit's bundle (bundle.sh in shared/gpu beside the checkout, which
# writes .gpu/) within 64 MiB. The kit's slim-tree.sh holds out the fixtures, models and
# training runs; the tree left was 4.32 MB on 2026-11-27,
# 64 KB too many beside the bundle's first part (62,855,785 bytes: 60 MiB parts, the CUDA
# provider in three). This script runs it, then holds out the tracked folders the GPU host
# never reads (the host runs the bundle's binaries, not the tree) the same way, and checks that
# the tree travels with every part. Since 2026-11-29 it holds out every top-level folder but
# scripts/ (gpu-lease.sh is all the host reads of the tree): 569 KB were left to spare then.
#   bash scripts/gpu-slim.sh --check    # would the slim tree fit beside each part? changes nothing
#   bash scripts/gpu-slim.sh            # after the kit's bundle.sh, before the uploads
#   bash scripts/gpu-slim.sh --restore  # right after the last upload; never commit while slim
# Exit 1 (having moved nothing) when the tree has changes to commit or would not fit.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
# The kit (only slimming and restoring use it; --check reads the tree alone).
kit=${V2L_GPU_KIT:-$(dirname "$root")/shared/gpu}
hold=${V2L_SLIM_HOLD:-/tmp/v2l-slim-hold}/more$(echo "$root" | tr / _)
# Held by slim-tree.sh, then by this script: none is read on the GPU host, which runs the
# bundle's binaries and scripts/gpu-lease.sh.
kit_held="tests/fixtures models training/runs"
kept="scripts"
# (Empty while the tree is slim, when git lists scripts/ alone.)
more=$(git ls-files | cut -s -d/ -f1 | sort -u | { grep -vxE "$(echo "$kept" | tr ' ' '|')" || true; } | tr '\n' ' ')
limit=$((64 * 1024 * 1024))
# The largest part the bundle writes (60 MiB less 64 KiB, its host-run.sh and part count).
part=62855785

# Bytes the device tool would carry for the tree as it is now, less the folders in $1.
travels() {
  local skip=$1 re
  re="^($(echo "$skip" | tr ' ' '|'))(/|$)"
  { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | grep -zvE "$re" | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

fits() {
  local tree=$1 biggest=$part p
  if [ -d .gpu ]; then
    for p in .gpu/p*; do
      [ -d "$p" ] || continue
      local b; b=$(du -sb "$p" | cut -f1)
      [ "$b" -gt "$biggest" ] && biggest=$b
    done
  fi
  echo "gpu-slim: tree $tree bytes + largest part $biggest = $((tree + biggest)) of $limit"
  [ $((tree + biggest)) -le "$limit" ]
}

case "${1:-}" in
  --check)
    fits "$(travels "$kit_held $more")" || { echo "gpu-slim: too large: hold out more, or split the bundle finer" >&2; exit 1; }
    exit 0 ;;
  --restore)
    # What was held, not what git lists now: the held folders are out of the index.
    shopt -s dotglob nullglob
    for h in "$hold"/*; do
      [ -e "$h" ] || continue
      d=$(basename "$h"); rm -rf "$d"; mv "$h" "$d"
    done
    sed -i '/^# v2l-slim-more$/,/^# v2l-slim-more-end$/d' .git/info/exclude
    exec bash "$kit/slim-tree.sh" --restore ;;
  "") ;;
  *) echo "gpu-slim: unknown argument $1 (--check, --restore or none)" >&2; exit 2 ;;
esac

[ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "gpu-slim: commit or stash your changes first" >&2; exit 1; }
fits "$(travels "$kit_held $more")" || { echo "gpu-slim: too large even slim; nothing moved" >&2; exit 1; }
bash "$kit/slim-tree.sh"
mkdir -p "$hold"
for d in $more; do
  [ -e "$d" ] || continue
  rm -rf "${hold:?}/$d"; mv "$d" "$hold/$d"; git rm -r -q --cached "$d"
done
{ echo '# v2l-slim-more'; for d in $more; do echo "/$d"; done; echo '# v2l-slim-more-end'; } >> .git/info/exclude
fits "$(travels "")"
echo "gpu-slim: restore with: bash scripts/gpu-slim.sh --restore (before any commit)"
