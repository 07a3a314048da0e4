#!/usr/bin/env bash
# Carry files to a GPU machine without network access, in pieces that fit a transfer limit.
#   here:  bash benchmarks/gpu/carry.sh pack DIR MB PATH...   (tar of the paths, split into DIR/carry.NN of MB MiB;
#                                                               a path may be ROOT:REL to store REL relative to ROOT)
#   there: bash benchmarks/gpu/carry.sh keep DIR              (each time a piece arrives in DIR; kept in $STORE/pieces)
#          bash benchmarks/gpu/carry.sh unpack                (all pieces there: untar into $STORE/in)
# Then e.g. install.sh install $STORE/in/.gpu_carry (vLLM) and CAB_CACHE_DIR=$STORE/in for GGUF models and text.
set -euo pipefail
STORE=${STORE:-/tmp/cabstore}
case ${1:-} in
  pack)
    dir=$2; mb=$3; shift 3
    args=()
    for p in "$@"; do
      if [[ $p == *:* ]]; then args+=(-C "${p%%:*}" "${p#*:}"); else args+=(-C "$PWD" "$p"); fi
    done
    mkdir -p "$dir"; rm -f "$dir"/carry.*
    tar cf - "${args[@]}" | split -b "${mb}M" -d -a 2 - "$dir/carry."
    ls -la "$dir"/carry.* ;;
  keep)
    mkdir -p "$STORE/pieces"; mv "$2"/carry.* "$STORE/pieces/"; ls "$STORE/pieces" | wc -l ;;
  unpack)
    mkdir -p "$STORE/in"
    cat $(ls "$STORE"/pieces/carry.* | sort) | tar xf - -C "$STORE/in"
    rm -rf "$STORE/pieces"; du -sh "$STORE/in" ;;  # (in/* would fail where only .gpu_carry is there)
  *) echo "usage: carry.sh pack DIR MB PATH... | keep DIR | unpack"; exit 2 ;;
esac
