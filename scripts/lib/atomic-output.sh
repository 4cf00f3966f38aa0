# Sourced by the guest toolchain wrappers (componentize-py.sh, jco.sh).
#
#   run_with_atomic_output FLAG LONG_FLAG TOOL ARGS...
#
# Runs TOOL ARGS with the file after FLAG or LONG_FLAG replaced by a temporary
# file beside it (its directory created first), then renames it into place:
# a build running at the same time (two test binaries, say) never sees a
# half-written output.
run_with_atomic_output() {
  local short="$1" long="$2" tool="$3"
  shift 3
  local args=("$@") i
  atomic_output=""
  for i in "${!args[@]}"; do
    if [ "${args[$i]}" = "$short" ] || [ "${args[$i]}" = "$long" ]; then
      atomic_output="${args[$((i + 1))]:-}"
      if [ -z "$atomic_output" ]; then
        echo "$(basename "$0"): ${args[$i]} needs a file" >&2
        exit 2
      fi
      mkdir -p "$(dirname "$atomic_output")"
      args[$((i + 1))]="$atomic_output.tmp.$$"
    fi
  done
  trap 'rm -f "$atomic_output.tmp.$$"' EXIT
  "$tool" "${args[@]}"
  if [ -n "$atomic_output" ]; then
    mv -f "$atomic_output.tmp.$$" "$atomic_output"
  fi
}
