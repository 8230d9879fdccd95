# Wave 10 call 2: the `latevote` A/B (NOTES.md "Experiment (wave 10): latevote"): skip path only, tile n's vote
# tested and recorded in tile n+1's step between the GEMM issue and the wait for S. The default's SASS is
# unchanged (checked locally, byte for byte). 7171 = d128 default | 4096, 7169 = d64 default | 4096.
set -u
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=7171@128;7169@64' AB_VARIANTS=default,latevote AB_REPEATS=4 \
  OUT=$OUT bash tools/gpu_suite.sh build ab
