export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # keeps what the caller added (e.g. the CUTLASS wheel)
V=$OUT/validate; mkdir -p $V   # every log here; packed into $OUT/validate_logs.tgz at the end (the device tool
                               # brings back at most 8 files)
S="compute-sanitizer --error-exitcode 9"
F8='import cupy, numpy, ml_dtypes; from tessera_cp import fp8; x = cupy.asarray(numpy.random.default_rng(0).standard_normal(4099).astype(ml_dtypes.bfloat16)); fp8.encode(x[1:], "e4m3", saturate=True); fp8.encode(x, "e5m2"); cupy.cuda.Device().synchronize(); print("fp8 ok")'
# tests/nn in two halves (about 6.5 min in one process on the H100 in session 16, with the gemv_mma variants)
(timeout 570 python3 -m pytest -q -m gpu tests/nn/test_attention.py tests/nn/test_casted.py > $V/gpu_nn.log 2>&1; echo "rc=$?" >> $V/gpu_nn.log) &
(timeout 570 python3 -m pytest -q -m gpu tests/nn --ignore=tests/nn/test_attention.py --ignore=tests/nn/test_casted.py > $V/gpu_nn2.log 2>&1; echo "rc=$?" >> $V/gpu_nn2.log) &
(timeout 570 python3 -m pytest -q -m gpu tests --ignore=tests/nn > $V/gpu_rest.log 2>&1; echo "rc=$?" >> $V/gpu_rest.log) &
(for t in tests/gpu_sanitize_issue4.py tests/gpu_sanitize_casted.py tests/models/gpu_sanitize_llama.py; do timeout 300 $S --tool memcheck python3 $t > $V/san_$(basename $t .py).log 2>&1; echo "rc=$?" >> $V/san_$(basename $t .py).log; done
 timeout 200 $S --tool memcheck python3 bench/tune_loss.py sanitize > $V/san_loss_mem.log 2>&1; echo "rc=$?" >> $V/san_loss_mem.log
 timeout 200 $S --tool racecheck python3 bench/tune_loss.py sanitize > $V/san_loss_race.log 2>&1; echo "rc=$?" >> $V/san_loss_race.log
 timeout 100 $S --tool memcheck python3 -c "$F8" > $V/san_fp8.log 2>&1; echo "rc=$?" >> $V/san_fp8.log) &
# the attention and paged-decode kernels, memcheck and racecheck, in a second chain beside the first
(for t in tests/gpu_sanitize_paged.py tests/gpu_sanitize_attention.py; do for tool in memcheck racecheck; do
   log=$V/san_$(basename $t .py)_$tool.log; timeout 240 $S --tool $tool python3 $t > $log 2>&1; echo "rc=$?" >> $log
 done; done) &
wait
for f in $V/*.log; do echo "== $(basename $f): $(grep -E 'passed|failed|ERROR SUMMARY|error|rc=' $f | tail -3 | tr '\n' ' ')"; done
grep -h -E "^(FAILED|ERROR)" $V/gpu_*.log | head -30
tar czf $OUT/validate_logs.tgz -C $OUT validate && rm -r $V
