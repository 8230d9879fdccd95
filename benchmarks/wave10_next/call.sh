# Prepared at the end of wave 9 for the next session's first device call (~4-5 min): the `peelmask` A/B (NOTES.md
# "Prepared, not measured (end of wave 9): peelmask"), correctness of both Q/K modes first (check_variants in the ab
# part). If it wins: make it the default bit (csrc/liteattn.h, default_variant), drop the other loop copy in
# mainloop.cuh, and run `bash tools/gpu_suite.sh build tests sanitize bench` on that version.
set -u
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=7171@128;7169@64' AB_VARIANTS=default,peelmask AB_REPEATS=3 \
  OUT=$OUT bash tools/gpu_suite.sh build ab
