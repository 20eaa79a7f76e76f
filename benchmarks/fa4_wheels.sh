#!/usr/bin/env bash
# FlashAttention-4 (CuTe DSL) for the GPU machine, which has no network: the wheels travel in
# two calls, since the CUDA-13 libraries' wheel (92 MB) exceeds one call's 64 MiB carry.
#   here, once:  benchmarks/fa4_wheels.sh prepare      (.fa4/a: small wheels + part 1; .fa4/b)
#   call 1:      carry [".fa4/a"]  command starts with: bash benchmarks/fa4_wheels.sh stash
#   call 2:      carry [".fa4/b"]  command starts with: source benchmarks/fa4_wheels.sh install
# (the warm machine keeps /tmp between calls made back to back; a carried path of one call is
# gone in the next). `install` joins the parts, checks the hash, installs into /tmp/fa4site and
# exports PYTHONPATH with the CuTe DSL's package folder on it: the DSL normally reaches that
# folder through a .pth file, which Python reads only in site-packages, never on PYTHONPATH.
FA4_PINS="flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
 nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 quack-kernels==0.6.5
 torch-c-dlpack-ext==0.1.5"
FA4_LIBS="nvidia-cutlass-dsl-libs-cu13==4.8.1"
FA4_SPLIT=48000000
case "${1:-}" in
  prepare)
    set -euo pipefail
    rm -rf .fa4 /tmp/fa4dl && mkdir -p .fa4/a .fa4/b /tmp/fa4dl
    grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo /.fa4/ >> .git/info/exclude
    pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any \
      -d /tmp/fa4dl $FA4_PINS $FA4_LIBS
    libs=$(ls /tmp/fa4dl/nvidia_cutlass_dsl_libs_cu13-*.whl)
    for w in /tmp/fa4dl/*.whl; do [ "$w" = "$libs" ] || cp "$w" .fa4/a/; done
    basename "$libs" > .fa4/b/libs.name
    sha256sum < "$libs" | cut -d' ' -f1 > .fa4/b/libs.sha256
    head -c $FA4_SPLIT "$libs" > .fa4/a/libs.part1
    tail -c +$((FA4_SPLIT + 1)) "$libs" > .fa4/b/libs.part2
    du -sh .fa4/a .fa4/b ;;
  stash)
    rm -rf /tmp/fa4stash && cp -r .fa4/a /tmp/fa4stash && ls /tmp/fa4stash ;;
  install)
    whl=/tmp/fa4stash/$(cat .fa4/b/libs.name)
    cat /tmp/fa4stash/libs.part1 .fa4/b/libs.part2 > "$whl"
    if [ "$(sha256sum < "$whl" | cut -d' ' -f1)" != "$(cat .fa4/b/libs.sha256)" ]; then
      echo "fa4: $whl sha256 mismatch (was call 1 made on this warm machine?)" >&2
    else
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/fa4site /tmp/fa4stash/*.whl
      dsl=/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
      export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/fa4site:$dsl"
      python3 -c "from flash_attn.cute import flash_attn_func; print('fa4: imports')" ||
        echo "fa4: does not import" >&2
    fi ;;
  *) echo "usage: $0 prepare|stash|install" >&2; exit 2 ;;
esac
