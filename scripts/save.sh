#!/usr/bin/env bash
# Saves an image as one gzipped tar for upload: `docker load -i FILE` brings it back.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/save.sh [-o FILE] [--level N] IMAGE

Writes IMAGE as a gzipped image archive (docker save | gzip), ready to upload or copy to a machine without a
registry, then prints its size and SHA-256. Load it there with: docker load -i FILE
(podman: gunzip -c FILE | podman load).

  -o, --output FILE   where to write (default: IMAGE with / and : made -, plus .tar.gz, in this folder)
  --level N           gzip level 1 (fast) to 9 (small); default 6. pigz is used when installed (all cores)
  -h, --help          this text
EOF
}

output=""
level=6
positional=()
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    -o | --output)
        need_value "$@"
        output=$2
        shift
        ;;
    --level)
        need_value "$@"
        [[ $2 =~ ^[1-9]$ ]] || usage_error "--level takes 1 to 9, not '$2'"
        level=$2
        shift
        ;;
    -*) usage_error "unknown option '$1'" ;;
    *) positional+=("$1") ;;
    esac
    shift
done
[[ ${#positional[@]} -eq 1 ]] || usage_error "expected one IMAGE, got ${#positional[@]}"
image=${positional[0]}
if [[ -z $output ]]; then
    output=${image//\//-}
    output=${output//:/-}.tar.gz
fi
[[ -d $(dirname "$output") ]] || die "folder $(dirname "$output") does not exist"

pick_engine
"$ENGINE" image inspect "$image" >/dev/null 2>&1 || die "no image '$image' in $ENGINE (build it with scripts/build.sh)"
compress=(gzip "-$level")
! command -v pigz >/dev/null 2>&1 || compress=(pigz "-$level")

save=("$ENGINE" save "$image")
# podman's default archive is docker-archive already; name it so a newer default cannot change the format.
[[ $ENGINE_KIND != podman ]] || save=("$ENGINE" save --format docker-archive "$image")

partial=$output.partial
trap 'rm -f "$partial"' EXIT
start=$SECONDS
note "saving $image with $ENGINE, compressing with ${compress[0]} -$level -> $output"
"${save[@]}" | "${compress[@]}" >"$partial" || die "saving $image failed"
mv "$partial" "$output"
trap - EXIT
bytes=$(stat -c %s "$output")
sum=$(sha256sum "$output" | cut -d' ' -f1)
note "wrote $output: $((bytes / 1048576)) MiB in $((SECONDS - start)) s, sha256 $sum"
note "load it with: docker load -i $output   (podman: gunzip -c $output | podman load)"
