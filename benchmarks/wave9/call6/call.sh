# Wave 9 call 6: the first run of `tools/gpu_suite.sh ab` (the new A/B part), on v10's row max (notreemax) against
# the v11 default at two d128 shapes, two repeats: a check of the tool more than a measurement.
set -u
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=1027@128' AB_VARIANTS=default,notreemax AB_REPEATS=2 \
  AB_SHAPES="4096,12,128 32760,12,128" OUT=$OUT bash tools/gpu_suite.sh build ab
