"""Runs under ``mpiexec -n N python tests/comm/mpi_worker.py [--device cpu|cuda] [--mode all|abort|timeout]``.

``all``: every collective, the layout helpers, distributed RMSNorm, ring attention and the tensor-parallel Linear
against NumPy (expected values computed here from every rank's seeded inputs), plus the recoverable fault cases.
Rank 0 prints ``ok <case>`` per case and ``ALL <k> CASES PASSED ON <N> RANKS`` at the end. Any failure is an
uncaught exception: the Mesh's excepthook prints it and aborts the job (non-zero exit).
``abort``: rank 1 raises while rank 0 waits in a barrier; the job must end with rank 1's message.
``timeout``: rank 0 calls all_reduce with timeout=1 while rank 1 never comes; the job must end with
CommTimeoutError. Not collected by pytest (no test_ prefix): tests/comm/test_mpi.py launches it.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy  # noqa: E402
from numpy.testing import assert_allclose, assert_array_equal  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--mode", default="all", choices=["all", "abort", "timeout"])
ARGS = parser.parse_args()
os.environ["TESSERA_DEVICE"] = ARGS.device

import ml_dtypes  # noqa: E402
from mpi4py import MPI  # noqa: E402

import tessera_cp as tc  # noqa: E402
from tessera_cp import comm  # noqa: E402
from tessera_cp.errors import DTypeError, ShapeError, TesseraError  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
DEV = ARGS.device
BF16 = numpy.dtype(ml_dtypes.bfloat16)
PASSED = []


def case(fn):
    fn()
    WORLD.Barrier()
    PASSED.append(fn.__name__)
    if RANK == 0:
        print(f"ok {fn.__name__}", flush=True)
    return fn


def T(array, dtype=None, requires_grad=False):
    return tc.tensor(numpy.asarray(array), dtype=dtype, device=DEV, requires_grad=requires_grad)


def value(seed, rank, shape, dtype=numpy.float64):
    """Rank ``rank``'s input for case ``seed``: every rank can make every other rank's."""
    return numpy.random.default_rng([seed, rank]).standard_normal(shape).astype(dtype)


def members(mesh, axes):
    """World ranks of this process's group along ``axes`` (row-major over axes in the order given)."""
    devices = numpy.asarray(mesh.devices)
    coords = numpy.argwhere(devices == RANK)[0]
    index = [mesh.axis_names.index(a) for a in axes]
    key = tuple(slice(None) if i in index else int(c) for i, c in enumerate(coords))
    sub = devices[key]  # remaining dims are the picked axes in mesh order
    kept = sorted(index)
    return sub.transpose([kept.index(i) for i in index]).reshape(-1).tolist()


def expect_error(kind, fn, *fragments, among=WORLD):
    try:
        fn()
    except kind as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {RANK}: expected {kind.__name__}")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    everyone = among.allgather(message)  # the same error on every rank of the group
    assert len(set(everyone)) == 1, everyone
    return message


# -------------------------------------------------------------------------------------------- meshes
if SIZE == 2:
    MESH = comm.Mesh(numpy.arange(2).reshape(1, 2), ["data", "model"])
    RING = comm.Mesh(numpy.array([1, 0]), ["seq"])  # a ring in reverse rank order
elif SIZE == 4:
    MESH = comm.Mesh(numpy.arange(4).reshape(2, 2), ["data", "model"])
    RING = comm.Mesh(numpy.array([2, 0, 3, 1]), ["seq"])
else:
    raise SystemExit("run with 2 or 4 processes")
AXES = [("model",), ("data",), ("data", "model"), ("model", "data")]


def run_all():
    @case
    def mesh_layout():
        coords = tuple(int(c) for c in numpy.argwhere(numpy.arange(SIZE).reshape(MESH.shape) == RANK)[0])
        assert MESH.coords == coords and MESH.rank == RANK
        assert MESH.size() == SIZE and MESH.size("model") == 2 and MESH.size("data") == SIZE // 2
        assert MESH.axis_rank("model") == coords[1] and MESH.axis_rank("data") == coords[0]
        assert RING.axis_rank("seq") == ([2, 0, 3, 1] if SIZE == 4 else [1, 0]).index(RANK)
        for axes in AXES:  # the communicator's order is the mesh's row-major order over the axes given
            group = MESH.group(axes)
            assert group.size == MESH.size(axes) == len(members(MESH, axes))
            assert group.rank == MESH.axis_rank(axes) == members(MESH, axes).index(RANK)
            assert list(group.members) == members(MESH, axes)
        # The seed's three named axes; a group of two of them is made on first use (by its members only).
        seed_mesh = comm.Mesh(numpy.arange(SIZE).reshape(1, SIZE // 2, 2), ["data", "model", "pipeline"])
        assert seed_mesh.size("pipeline") == 2 and seed_mesh.size(("model", "pipeline")) == SIZE
        group = members(seed_mesh, ("pipeline", "model"))
        got = comm.all_gather(T(numpy.array([float(RANK)])), ("pipeline", "model"), mesh=seed_mesh)
        assert_array_equal(got.numpy(), numpy.array(group, dtype=float))
        if RANK == 0:
            print(f"transport: cuda_aware={MESH.cuda_aware} nccl={MESH.use_nccl} ({MESH.transport_reason})")

    @case
    def all_reduce_ops_axes_dtypes():
        for axes in AXES:
            group = members(MESH, axes)
            for dtype in (numpy.float64, numpy.float32, BF16):
                inputs = {r: value(1, r, (3, 5), dtype) for r in group}
                wide = numpy.stack([inputs[r].astype(numpy.float64) for r in group])
                for op, expected in (("sum", wide.sum(0)), ("mean", wide.mean(0)), ("max", wide.max(0)),
                                     ("min", wide.min(0))):
                    out = comm.all_reduce(T(inputs[RANK]), axes, op, mesh=MESH)
                    assert out.dtype is tc.dtypes.as_dtype(dtype) and out.shape == (3, 5)
                    got = out.numpy().astype(numpy.float64)
                    if op in ("max", "min"):  # exact in any dtype
                        assert_array_equal(got, expected)
                    elif dtype == numpy.float64:
                        assert_allclose(got, expected, rtol=1e-14, atol=1e-15)
                    else:  # f32 additions (n - 1 roundings), then bf16's one rounding
                        ulp = 2.0 ** -8 if dtype == BF16 else 0.0
                        assert_allclose(got, expected, rtol=ulp + len(group) * 2.0 ** -24, atol=1e-6)
            if len(group) == 4:
                # bf16 is reduced in f32 and rounded once: 1 + 3 * 2^-9 -> 1 + 2^-7, where adding in bf16 one
                # value at a time would round every partial sum back to 1.
                tiny = numpy.array([1.0 if RANK == group[0] else 2.0 ** -9] * 4, dtype=BF16)
                out = comm.all_reduce(T(tiny), axes, "sum", mesh=MESH).numpy().astype(numpy.float64)
                assert_array_equal(out, numpy.full(4, 1.0 + 2.0 ** -7))
            scalar = comm.all_reduce(T(numpy.float64(RANK + 0.5)), axes, "mean", mesh=MESH)  # e.g. a loss
            assert scalar.shape == () and scalar.item() == numpy.mean([r + 0.5 for r in group])
            ints = {r: numpy.arange(6, dtype=numpy.int32) * (r + 1) for r in group}
            out = comm.all_reduce(T(ints[RANK]), axes, "sum", mesh=MESH)
            assert out.dtype is tc.int32
            assert_array_equal(out.numpy(), sum(ints.values()))
            flags = {r: numpy.array([r == group[0], True, False]) for r in group}
            stacked = numpy.stack(list(flags.values()))
            assert_array_equal(comm.all_reduce(T(flags[RANK]), axes, "max", mesh=MESH).numpy(), stacked.any(0))
            assert_array_equal(comm.all_reduce(T(flags[RANK]), axes, "min", mesh=MESH).numpy(), stacked.all(0))
        # The seed's spelling inside @on_mesh, and the default axis of mesh.axis(...).
        @tc.comm.on_mesh(MESH)
        def seed_reduce(x):
            return tc.comm.mesh_reduce(x, axis="data", op="mean")
        group = members(MESH, ("data",))
        got = seed_reduce(T(value(2, RANK, (4,))))
        assert_allclose(got.numpy(), numpy.mean([value(2, r, (4,)) for r in group], 0), rtol=1e-14)
        with MESH.axis("model"):
            got = comm.all_reduce(T(value(3, RANK, (2,))))
        assert_allclose(got.numpy(), sum(value(3, r, (2,)) for r in members(MESH, ("model",))), rtol=1e-14)
        with MESH:
            got = comm.all_reduce(T(value(3, RANK, (2,))))
        assert_allclose(got.numpy(), sum(value(3, r, (2,)) for r in range(SIZE)), rtol=1e-14)

    @case
    def all_reduce_gradients():
        for axes in AXES:
            group = members(MESH, axes)
            n = len(group)
            cot = {r: value(11, r, (2, 3)) for r in group}
            total = sum(cot.values())
            for op in ("sum", "mean"):
                x = T(value(10, RANK, (2, 3)), requires_grad=True)
                (comm.all_reduce(x, axes, op, mesh=MESH) * T(cot[RANK])).sum().backward()
                assert_allclose(x.grad.numpy(), total / (n if op == "mean" else 1), rtol=1e-13)
            # max with ties: small integers make several ranks hold the maximum of an element.
            ints = {r: numpy.random.default_rng([12, r]).integers(0, 3, (2, 3)).astype(numpy.float64) for r in group}
            top = numpy.max([ints[r] for r in group], 0)
            ties = numpy.sum([ints[r] == top for r in group], 0)
            for op, pick in (("max", top), ("min", numpy.min([ints[r] for r in group], 0))):
                x = T(ints[RANK], requires_grad=True)
                (comm.all_reduce(x, axes, op, mesh=MESH) * T(cot[RANK])).sum().backward()
                held = ints[RANK] == pick
                count = numpy.sum([ints[r] == pick for r in group], 0)
                assert_allclose(x.grad.numpy(), numpy.where(held, total / count, 0.0), rtol=1e-13)
            assert len(group) == 1 or ties.max() >= 2  # the case really has ties

    @case
    def all_gather_and_its_gradient():
        for axes in AXES:
            group = members(MESH, axes)
            for dim in (0, 1, -1):
                # Unequal shards along the gathered dim: rank r holds 1 + (r % 3) entries there.
                shape = {r: [2, 3, 4] for r in group}
                for r in group:
                    shape[r][dim] = 1 + r % 3
                inputs = {r: value(20, r, shape[r]) for r in group}
                cot_full = {r: value(21, r, numpy.concatenate([inputs[m] for m in group], dim).shape) for r in group}
                x = T(inputs[RANK], requires_grad=True)
                out = comm.all_gather(x, axes, dim, mesh=MESH)
                expected = numpy.concatenate([inputs[r] for r in group], axis=dim)
                assert_array_equal(out.numpy(), expected)
                (out * T(cot_full[RANK])).sum().backward()
                # d/dx_me of sum_r <cot_r, gather> = sum over ranks of their cotangent's slice at my position.
                start = sum(inputs[r].shape[dim] for r in group[:group.index(RANK)])
                mine = numpy.take(sum(cot_full.values()), range(start, start + inputs[RANK].shape[dim]), axis=dim)
                assert_allclose(x.grad.numpy(), mine, rtol=1e-13)
        for dtype in (BF16, tc.fp8_e4m3):  # movement is raw bytes: bf16 and fp8 come back bit-exact
            group = members(MESH, ("model",))
            host = {r: value(22, r, (2, 3)).astype(numpy.float32) for r in group}
            if dtype is tc.fp8_e4m3:
                x = T(host[RANK]).astype(tc.fp8_e4m3)
                expected = numpy.concatenate([host[r].astype(ml_dtypes.float8_e4m3fn) for r in group])
            else:
                x = T(host[RANK].astype(BF16))
                expected = numpy.concatenate([host[r].astype(BF16) for r in group])
            out = comm.all_gather(x, "model", 0, mesh=MESH)
            assert out.dtype is x.dtype
            assert_array_equal(out.numpy().view(numpy.uint8), expected.view(numpy.uint8))

    @case
    def reduce_scatter_and_its_gradient():
        for axes in AXES:
            group = members(MESH, axes)
            n = len(group)
            for dim, length in ((0, 2 * n + 1), (1, 3), (-1, n)):
                shape = [length if d == dim % 3 else 2 for d in range(3)]
                inputs = {r: value(30, r, shape) for r in group}
                pieces = numpy.array_split(sum(inputs.values()), n, axis=dim)
                me = group.index(RANK)
                for op in ("sum", "mean"):
                    x = T(inputs[RANK], requires_grad=True)
                    out = comm.reduce_scatter(x, axes, dim, op, mesh=MESH)
                    expected = pieces[me] / (n if op == "mean" else 1)
                    assert_allclose(out.numpy(), expected, rtol=1e-13, atol=1e-15)
                    cot = {r: value(31, r, numpy.array_split(numpy.zeros(shape), n, axis=dim)[group.index(r)].shape)
                           for r in group}
                    (out * T(cot[RANK])).sum().backward()
                    whole = numpy.concatenate([cot[r] for r in group], axis=dim) / (n if op == "mean" else 1)
                    assert_allclose(x.grad.numpy(), whole, rtol=1e-13)

    @case
    def broadcast_and_its_gradient():
        for axes in AXES:
            group = members(MESH, axes)
            for src in (0, len(group) - 1):
                x = T(value(40, RANK, (3, 2)), requires_grad=True)
                out = comm.broadcast(x, axes, src, mesh=MESH)
                assert_array_equal(out.numpy(), value(40, group[src], (3, 2)))
                cot = {r: value(41, r, (3, 2)) for r in group}
                (out * T(cot[RANK])).sum().backward()
                expected = sum(cot.values()) if group.index(RANK) == src else numpy.zeros((3, 2))
                assert_allclose(x.grad.numpy(), expected, rtol=1e-13)

    @case
    def ring_exchange_and_its_gradient():
        for mesh, axes in ((MESH, ("model",)), (MESH, ("data", "model")), (RING, ("seq",))):
            group = members(mesh, axes)
            n, me = len(group), group.index(RANK)
            for shift in (1, -1, 2):
                x = T(value(50, RANK, (2, 3)), requires_grad=True)
                handle = comm.ring_exchange(x, axes, shift, mesh=mesh, wait=False)
                busy = (x * 2.0).sum()  # computation while the transfer is in flight
                out = handle.wait()
                assert_array_equal(out.numpy(), value(50, group[(me - shift) % n], (2, 3)))
                cot = {r: value(51, r, (2, 3)) for r in group}
                (out * T(cot[RANK]) + busy * 0.0).sum().backward()
                # My x went `shift` ranks ahead; that rank's cotangent is my gradient.
                assert_allclose(x.grad.numpy(), cot[group[(me + shift) % n]], rtol=1e-14)
        seeded = comm.ring_exchange(T(value(52, RANK, (3,))), RING)  # the seed's ring_exchange(x, mesh)
        order = members(RING, ("seq",))
        assert_array_equal(seeded.numpy(), value(52, order[(order.index(RANK) - 1) % SIZE], (3,)))

    @case
    def barrier_and_timeouts_that_are_met():
        comm.barrier(mesh=MESH)
        comm.barrier("model", mesh=MESH, timeout=30.0)
        out = comm.all_reduce(T(numpy.ones(3)), "data", mesh=MESH, timeout=30.0)
        assert_array_equal(out.numpy(), numpy.full(3, SIZE // 2))

    @case
    def distribute_gather_mesh_tensor():
        full = value(60, 0, (5, 3, 7))  # the same on every rank: seed 60, "rank" 0
        sharding = {0: "data", -1: "model"}
        mt = comm.distribute(T(full), MESH, sharding)
        data_index, model_index = MESH.axis_rank("data"), MESH.axis_rank("model")
        piece = numpy.array_split(numpy.array_split(full, SIZE // 2, 0)[data_index], 2, 2)[model_index]
        assert_array_equal(mt.numpy(), piece)
        assert mt.sharding == {0: ("data",), 2: ("model",)}
        doubled = mt * 2.0 + mt
        assert isinstance(doubled, comm.MeshTensor) and doubled.sharding == mt.sharding
        assert_array_equal(comm.gather(doubled).numpy(), full * 3.0)
        partial = comm.all_gather(mt, "model", -1)  # a MeshTensor: the gathered dim leaves the sharding
        assert partial.sharding == {0: ("data",)}
        assert_array_equal(partial.numpy(), numpy.array_split(full, SIZE // 2, 0)[data_index])
        # src: only mesh rank 1's values count.
        mine = comm.distribute(T(value(61, RANK, (4, 6))), MESH, {1: ("data", "model")}, src=1)
        assert_array_equal(mine.numpy(), numpy.array_split(value(61, 1, (4, 6)), SIZE, 1)[RANK])
        scattered = comm.reduce_scatter(comm.MeshTensor(T(numpy.ones((SIZE, 2))), MESH), ("data", "model"), 0)
        assert scattered.sharding == {0: ("data", "model")}
        assert_array_equal(scattered.numpy(), numpy.full((1, 2), SIZE))

    @case
    def distributed_rms_norm_matches_rms_norm():
        D, eps = 13, 1e-5  # 13 does not split evenly: the global D must divide, not the mean of means
        x_full = value(70, 0, (2, 3, D)) * 3.0
        w_full = value(71, 0, (D,))
        cot_full = value(72, 0, (2, 3, D))
        model = MESH.axis_rank("model")
        pieces = numpy.array_split(numpy.arange(D), 2)[model]
        lo, hi = pieces[0], pieces[-1] + 1
        # Reference (float64, single process): y = x * r * w, r = (mean(x^2) + eps)^-1/2, and its gradients.
        r = 1.0 / numpy.sqrt((x_full ** 2).mean(-1, keepdims=True) + eps)
        y_ref = x_full * r * w_full
        gw = cot_full * w_full
        dx_ref = r * gw - x_full * r ** 3 * (gw * x_full).sum(-1, keepdims=True) / D
        dw_ref = (cot_full * x_full * r).sum((0, 1))
        for weight_is_full in (False, True):
            x = T(x_full[..., lo:hi], requires_grad=True)
            w = T(w_full if weight_is_full else w_full[lo:hi], requires_grad=True)
            y = comm.distributed_rms_norm(x, w, MESH, eps)
            assert_allclose(y.numpy(), y_ref[..., lo:hi], rtol=1e-12)
            (y * T(cot_full[..., lo:hi])).sum().backward()
            assert_allclose(x.grad.numpy(), dx_ref[..., lo:hi], rtol=1e-10, atol=1e-12)
            # Every data-axis rank holds the same batch here, so the weight gradient is the single-process one.
            dw = w.grad.numpy()[lo:hi] if weight_is_full else w.grad.numpy()
            assert_allclose(dw, dw_ref[lo:hi], rtol=1e-10, atol=1e-12)
            if weight_is_full:
                assert not w.grad.numpy()[:lo].any() and not w.grad.numpy()[hi:].any()
        # bf16: statistics in f32, then two roundings (normalised x, times weight) of at most 2^-8 each.
        xb, wb = x_full.astype(BF16), w_full.astype(BF16)
        xb64, wb64 = xb.astype(numpy.float64), wb.astype(numpy.float64)
        ref = xb64 / numpy.sqrt((xb64 ** 2).mean(-1, keepdims=True) + eps) * wb64
        y = comm.distributed_rms_norm(comm.MeshTensor(T(xb[..., lo:hi]), MESH, {-1: "model"}), T(wb[lo:hi]),
                                      eps=eps)
        assert isinstance(y, comm.MeshTensor) and y.dtype is tc.bf16
        err = numpy.abs(y.numpy().astype(numpy.float64) - ref[..., lo:hi])
        assert (err <= 2.0 ** -7 * numpy.abs(ref[..., lo:hi]) + 1e-6).all(), err.max()
        optional = getattr(tc.nn, "rms_norm", None)  # the single-process op, once it exists
        if optional is not None:
            single = optional(T(x_full), T(w_full), eps=eps)
            assert_allclose(comm.distributed_rms_norm(T(x_full[..., lo:hi]), T(w_full), MESH, eps).numpy(),
                            single.numpy()[..., lo:hi], rtol=1e-12)

    def attention_reference(q, k, v, causal, scale, cot):
        """Single-process attention over the whole sequence with core Tensor ops; the tape gives gradients."""
        B, H, S, Dq = q.shape
        Hk = k.shape[1]
        tq, tk, tv = (tc.tensor(a, device="cpu", requires_grad=True) for a in (q, k, v))
        qg = tq.reshape(B, Hk, H // Hk, S, Dq)
        scores = (qg @ tk.unsqueeze(2).transpose(-1, -2)) * scale
        if causal:
            future = numpy.triu(numpy.ones((S, S), dtype=bool), 1)
            scores = scores.masked_fill(tc.tensor(future, device="cpu"), float("-inf"))
        out = (scores.softmax(-1) @ tv.unsqueeze(2)).reshape(B, H, S, v.shape[-1])
        (out * tc.tensor(cot, device="cpu")).sum().backward()
        return out.numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()

    @case
    def ring_attention_matches_full_attention():
        rings = [(RING, ("seq",)), (MESH, ("model",)), (MESH, ("data",))]  # ("data",) has 1 rank when N = 2
        if SIZE == 4:
            rings.append((MESH, ("data", "model")))
        for mesh, axes in rings:
            group = members(mesh, axes)
            n, me = len(group), group.index(RANK)
            lengths = {1: [4], 2: [3, 5], 4: [2, 4, 1, 3]}[n]
            S = sum(lengths)
            lo = sum(lengths[:me])
            hi = lo + lengths[me]
            seed = 80 + 10 * group[0]  # one sequence per ring
            B, H, Hk, Dq, Dv = 2, 4, 2, 8, 5
            q, k, v = value(seed, 0, (B, H, S, Dq)), value(seed, 1, (B, Hk, S, Dq)), value(seed, 2, (B, Hk, S, Dv))
            cot = value(seed, 3, (B, H, S, Dv))
            for causal in (False, True):
                ref, dq_ref, dk_ref, dv_ref = attention_reference(q, k, v, causal, 0.3, cot)
                tq, tk, tv = (T(a[:, :, lo:hi], requires_grad=True) for a in (q, k, v))
                out = comm.ring_attention(tq, tk, tv, mesh, axes, causal, scale=0.3)
                assert_allclose(out.numpy(), ref[:, :, lo:hi], rtol=1e-11, atol=1e-13)
                (out * T(cot[:, :, lo:hi])).sum().backward()
                assert_allclose(tq.grad.numpy(), dq_ref[:, :, lo:hi], rtol=1e-10, atol=1e-12)
                assert_allclose(tk.grad.numpy(), dk_ref[:, :, lo:hi], rtol=1e-10, atol=1e-12)
                assert_allclose(tv.grad.numpy(), dv_ref[:, :, lo:hi], rtol=1e-10, atol=1e-12)
        # bf16: the ring's error against float64 within 2x that of the plain reference run in bf16 inputs with
        # f32 arithmetic and a bf16 result (the flash-attention rule).
        group = members(RING, ("seq",))
        me = group.index(RANK)
        S_local = 6
        S = S_local * SIZE
        q, k, v = (value(90, i, (1, 2, S, 16)).astype(BF16) for i in range(3))
        lo, hi = me * S_local, (me + 1) * S_local
        out = comm.ring_attention(*(T(a[:, :, lo:hi]) for a in (q, k, v)), RING, "seq", True)
        assert out.dtype is tc.bf16
        ref64, *_ = attention_reference(*(a.astype(numpy.float64) for a in (q, k, v)), True, 0.25,
                                        numpy.zeros((1, 2, S, 16)))
        scores = (q.astype(numpy.float32) @ k.astype(numpy.float32).swapaxes(-1, -2)) * numpy.float32(0.25)
        scores[..., numpy.triu(numpy.ones((S, S), dtype=bool), 1)] = -numpy.inf
        p = numpy.exp(scores - scores.max(-1, keepdims=True))
        plain = ((p / p.sum(-1, keepdims=True)) @ v.astype(numpy.float32)).astype(BF16)
        tc.testing.assert_low_precision_close(out.numpy().astype(numpy.float64), ref64[:, :, lo:hi],
                                              plain[:, :, lo:hi].astype(numpy.float64))

    def plain_low_precision_attention(q, k, v, causal, scale, dout):
        """Attention and its gradients in bf16 the plain way: every product, score, probability and gradient
        rounded to bf16 (sums in f32), K/V expanded to the query heads. The error yardstick of the flash rule."""
        def rnd(a):
            return a.astype(BF16).astype(numpy.float32)
        B, H, S, Dq = q.shape
        G = H // k.shape[1]
        qf, kf, vf, do = (a.astype(numpy.float32) for a in (q, k, v, dout))
        ke, ve = kf[:, numpy.arange(H) // G], vf[:, numpy.arange(H) // G]
        s = rnd(rnd(qf @ ke.swapaxes(-1, -2)) * numpy.float32(scale))
        if causal:
            s = numpy.where(numpy.triu(numpy.ones((S, S), dtype=bool), 1), -numpy.inf, s)
        e = numpy.exp(s - s.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        pr = rnd(p)
        out = rnd(pr @ ve)
        dve = rnd(pr.swapaxes(-1, -2) @ do)
        dp = rnd(do @ ve.swapaxes(-1, -2))
        ds = rnd(p * (dp - (do * out).sum(-1, keepdims=True)))
        dq = rnd(ds @ ke * numpy.float32(scale))
        dke = rnd(ds.swapaxes(-1, -2) @ qf * numpy.float32(scale))
        fold = (B, k.shape[1], G, S, -1)
        return out, dq, dke.reshape(fold).sum(2), dve.reshape(fold).sum(2)

    @case
    def ring_attention_bf16_forward_backward():
        # Equal shards and head dim 64: on a GPU the fully visible and diagonal blocks run the flash kernels.
        group = members(RING, ("seq",))
        me, S_local = group.index(RANK), 40
        S, lo, hi = S_local * SIZE, me * S_local, (me + 1) * S_local
        q = value(95, 0, (1, 4, S, 64)).astype(BF16)
        k, v = value(95, 1, (1, 2, S, 64)).astype(BF16), value(95, 2, (1, 2, S, 64)).astype(BF16)
        dout = value(95, 3, (1, 4, S, 64)).astype(BF16)
        for causal in (False, True):
            tq, tk, tv = (T(a[:, :, lo:hi], requires_grad=True) for a in (q, k, v))
            out = comm.ring_attention(tq, tk, tv, RING, "seq", causal)
            out.backward(T(dout[:, :, lo:hi]))
            ref64 = attention_reference(*(a.astype(numpy.float64) for a in (q, k, v)), causal, 0.125,
                                        dout.astype(numpy.float64))
            plain = plain_low_precision_attention(q, k, v, causal, 0.125, dout)
            for name, got, r64, lp in zip(("out", "dq", "dk", "dv"), (out, tq.grad, tk.grad, tv.grad), ref64, plain):
                assert got.dtype is tc.bf16, name
                r64, lp = r64[:, :, lo:hi], lp[:, :, lo:hi].astype(numpy.float64)
                tc.testing.assert_low_precision_close(got.numpy().astype(numpy.float64), r64, lp,
                                                      atol=1e-4 * float(numpy.abs(r64).max()) + 1e-6)

    @case
    def tensor_parallel_linear_matches_linear():
        gen = tc.Generator(5)
        first, second = tc.nn.Linear(7, 11, generator=gen, dtype=tc.f64), tc.nn.Linear(11, 6, generator=gen,
                                                                                      dtype=tc.f64)
        x_host = value(100, 0, (3, 7))
        cot = value(101, 0, (3, 6))
        # Single process.
        x = tc.tensor(x_host, requires_grad=True)
        y_ref = second(first(x).relu())
        (y_ref * tc.tensor(cot)).sum().backward()
        model = MESH.axis_rank("model")
        lo, hi = [(0, 6), (6, 11)][model]  # array_split of 11 features over 2 ranks
        for gather_output in (False, True):
            col = comm.ColumnParallelLinear.from_linear(first, MESH, "model", gather_output=gather_output)
            row = comm.RowParallelLinear.from_linear(second, MESH, "model", input_is_parallel=not gather_output)
            assert (col.start, col.stop) == (lo, hi) and (row.start, row.stop) == (lo, hi)
            xp = T(x_host, requires_grad=True)
            hidden = col(xp).relu()
            assert hidden.shape == ((3, 11) if gather_output else (3, hi - lo))
            y = row(hidden)
            assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-12)
            (y * T(cot)).sum().backward()  # every rank computes the same (replicated) loss
            assert_allclose(xp.grad.numpy(), x.grad.numpy(), rtol=1e-11)
            assert_allclose(col.weight.grad.numpy(), first.weight.grad.numpy()[lo:hi], rtol=1e-11)
            assert_allclose(col.bias.grad.numpy(), first.bias.grad.numpy()[lo:hi], rtol=1e-11)
            assert_allclose(row.weight.grad.numpy(), second.weight.grad.numpy()[:, lo:hi], rtol=1e-11)
            assert_allclose(row.bias.grad.numpy(), second.bias.grad.numpy(), rtol=1e-11)
        built = comm.ColumnParallelLinear(7, 11, MESH, generator=tc.Generator(5), dtype=tc.f64)
        assert_array_equal(built.weight.numpy(), first.weight.numpy()[lo:hi])  # same init as nn.Linear

    @case
    def faults_give_the_same_error_everywhere():
        expect_error(ShapeError, lambda: comm.Mesh(numpy.arange(SIZE + 2)), f"job has {SIZE} processes")
        expect_error(TesseraError, lambda: comm.Mesh(numpy.zeros(SIZE, dtype=int)), "repeats ranks [0]")
        expect_error(TesseraError, lambda: comm.Mesh(numpy.arange(SIZE), ["a" if RANK else "b"]),
                     "built different meshes")
        # A shape that differs on one rank: an error on every rank, and the mesh still works afterwards.
        odd = (2, 3) if RANK != SIZE - 1 else (2, 4)
        expect_error(ShapeError, lambda: comm.all_reduce(T(numpy.ones(odd)), None, mesh=MESH),
                     "shapes disagree", f"rank {SIZE - 1}: f64 (2, 4)")
        expect_error(DTypeError, lambda: comm.all_reduce(T(numpy.ones(3, numpy.float32 if RANK else numpy.float64)),
                                                         None, mesh=MESH), "dtypes disagree")
        expect_error(TesseraError, lambda: comm.all_reduce(T(numpy.ones(3)), None, "max" if RANK else "sum",
                                                           mesh=MESH), "different arguments", "op='max'")
        shape = (2, 3, 1 + RANK) if RANK else (2, 4, 1)  # gathering dim 2 may differ, dim 1 may not
        expect_error(ShapeError, lambda: comm.all_gather(T(numpy.ones(shape)), None, 2, mesh=MESH),
                     "except along dim 2")
        heads = 3 if RANK == 1 else 2  # a local argument error on rank 1 only
        expect_error(ShapeError, lambda: comm.ring_attention(T(numpy.ones((1, 4, 2, 8))),
                                                             T(numpy.ones((1, heads, 2, 8))),
                                                             T(numpy.ones((1, heads, 2, 8))), RING, "seq"),
                     "rank 1", "not a multiple")
        row = comm.RowParallelLinear(8, 3, MESH, "model", generator=tc.Generator(1), dtype=tc.f64)
        features = 5 if MESH.axis_rank("model") == 1 else 4  # wrong on one rank of each model group
        expect_error(TesseraError, lambda: row(T(numpy.ones((2, features)))), "x features minus expected=1",
                     among=MESH.group("model").comm)
        expect_error(TesseraError, lambda: comm.all_reduce(T(numpy.ones(2)), "nope", mesh=MESH), "'nope'")
        out = comm.all_reduce(T(numpy.ones(2)), mesh=MESH)  # still usable
        assert_array_equal(out.numpy(), [SIZE, SIZE])

    WORLD.Barrier()
    if RANK == 0:
        print(f"ALL {len(PASSED)} CASES PASSED ON {SIZE} RANKS", flush=True)


def run_abort():
    if RANK == 1:
        time.sleep(0.5)
        raise RuntimeError("deliberate failure on rank 1")
    comm.barrier(mesh=MESH)  # would block forever without the abort
    print("rank 0 passed the barrier: the abort did not happen", flush=True)


def run_timeout():
    unchecked = comm.Mesh(numpy.arange(SIZE), ["all"], check=False)  # no argument check: the data phase waits
    if RANK == 0:
        try:  # the argument check is the first thing to wait
            comm.all_reduce(T(numpy.ones(3)), mesh=MESH, timeout=1.0)
        except comm.CommTimeoutError as e:
            print(f"caught CommTimeoutError: {e}", flush=True)
        else:
            print("rank 0: all_reduce returned without its partners", flush=True)
        try:  # the Iallreduce itself; the mesh's default timeout applies
            unchecked.timeout = 1.0
            comm.all_reduce(T(numpy.ones(3)), mesh=unchecked)
        except comm.CommTimeoutError as e:
            print(f"caught CommTimeoutError: {e}", flush=True)
            raise  # uncaught: the excepthook aborts the job
        print("rank 0: all_reduce returned without its partners", flush=True)
    else:
        time.sleep(120)  # never joins; the abort ends this process


{"all": run_all, "abort": run_abort, "timeout": run_timeout}[ARGS.mode]()
