import pytest
import torch

from v2xfuse import ops
from v2xfuse.ops import reference

needs_extension = pytest.mark.skipif(not ops.extension_available(),
                                     reason="v2xfuse._C is not built")

IMPLS = {"op": ops.bev_pool, "reference": reference.bev_pool}


def lifted_points(n_points, channels, batch_size, ny, nx, seed, dtype=torch.float32,
                  crowd=0):
    """Random points, the first `crowd` of them all in cell (batch 0, y 1, x 2)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_points, channels, generator=g, dtype=torch.float64).to(dtype)
    coords = torch.stack([torch.randint(0, batch_size, (n_points,), generator=g),
                          torch.randint(0, ny, (n_points,), generator=g),
                          torch.randint(0, nx, (n_points,), generator=g)], dim=1)
    coords[:crowd] = torch.tensor([0, 1, 2])
    # Shuffle so the crowded cell's points are spread over the point list.
    perm = torch.randperm(n_points, generator=g)
    return features[perm].contiguous(), coords[perm].int()


def test_gradcheck_reference_float64():
    features, coords = lifted_points(40, 3, 2, 3, 4, 0, torch.float64, crowd=10)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: reference.bev_pool(f, coords, 2, 3, 4), (features,))


def test_gradcheck_op_float64():
    features, coords = lifted_points(40, 3, 2, 3, 4, 1, torch.float64, crowd=10)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: ops.bev_pool(f, coords, 2, 3, 4), (features,))


@pytest.mark.parametrize("crowd", [0, 500])
def test_op_matches_reference_float32(crowd):
    batch_size, ny, nx, channels = 2, 13, 17, 8
    features, coords = lifted_points(3000, channels, batch_size, ny, nx, 2, crowd=crowd)
    f_op = features.clone().requires_grad_(True)
    f_ref = features.clone().requires_grad_(True)
    out_op = ops.bev_pool(f_op, coords, batch_size, ny, nx)
    out_ref = reference.bev_pool(f_ref, coords, batch_size, ny, nx)
    assert out_op.shape == (batch_size, channels, ny, nx) and out_op.dtype == torch.float32
    torch.testing.assert_close(out_op, out_ref, atol=1e-4, rtol=1e-5)
    grad = torch.randn_like(out_op)
    (out_op * grad).sum().backward()
    (out_ref * grad).sum().backward()
    torch.testing.assert_close(f_op.grad, f_ref.grad, atol=0, rtol=0)  # both pure gathers
    if crowd:
        torch.testing.assert_close(out_op[0, :, 1, 2], features[coords[:, 0].eq(0)
                                   & coords[:, 1].eq(1) & coords[:, 2].eq(2)].sum(0),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_empty_cells_are_zero_and_sums_are_right(impl):
    features = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    coords = torch.tensor([[1, 0, 2], [0, 1, 0], [1, 0, 2]])
    out = IMPLS[impl](features, coords, 2, 2, 3)
    expected = torch.zeros(2, 2, 2, 3)
    expected[1, :, 0, 2] = torch.tensor([5.0, 50.0])
    expected[0, :, 1, 0] = torch.tensor([2.0, 20.0])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_points(impl):
    features = torch.zeros(0, 4, requires_grad=True)
    out = IMPLS[impl](features, torch.zeros(0, 3, dtype=torch.long), 1, 2, 2)
    assert out.shape == (1, 4, 2, 2) and torch.all(out == 0)
    out.sum().backward()
    assert features.grad.shape == (0, 4)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("bad_row", [[-1, 0, 0], [2, 0, 0], [0, -1, 0], [0, 3, 0], [0, 0, -1],
                                     [0, 0, 4]])
def test_out_of_range_coords_raise(impl, bad_row):
    features = torch.ones(3, 2)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], bad_row])
    with pytest.raises(ValueError, match=r"coords\[2\].*outside the grid"):
        IMPLS[impl](features, coords, 2, 3, 4)


def test_bad_arguments():
    features, coords = lifted_points(10, 2, 1, 2, 2, 0)
    for fn in IMPLS.values():
        with pytest.raises(ValueError, match="coords must be"):
            fn(features, coords[:, :2], 1, 2, 2)
        with pytest.raises(ValueError, match="integer"):
            fn(features, coords.float(), 1, 2, 2)
        with pytest.raises(ValueError, match="features"):
            fn(features.long(), coords, 1, 2, 2)


def test_layouts_and_dtypes():
    features, coords = lifted_points(200, 6, 2, 4, 5, 3, torch.float64)
    expected = reference.bev_pool(features, coords, 2, 4, 5)
    strided = features.T.contiguous().T  # column-major: same values, not contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(ops.bev_pool(strided, coords.long(), 2, 4, 5), expected)
    assert ops.bev_pool(features.double(), coords, 2, 4, 5).dtype == torch.float64
    half = ops.bev_pool(features.to(torch.bfloat16), coords, 2, 4, 5)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, atol=0.1, rtol=0.02)


@needs_extension
def test_kernel_checks_its_arguments():
    features, coords = lifted_points(10, 2, 1, 2, 2, 0)
    with pytest.raises(RuntimeError, match="coords must be"):
        torch.ops.v2xfuse.bev_pool_forward(features, coords[:5], 1, 2, 2)
    with pytest.raises(ValueError, match="outside the grid"):
        torch.ops.v2xfuse.bev_pool_forward(features, coords, 1, 1, 1)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.v2xfuse.bev_pool_backward(features, coords)


def _stable_grouping(coords, batch_size, ny, nx):
    cells = (coords[:, 0].long() * ny + coords[:, 1].long()) * nx + coords[:, 2].long()
    order = torch.sort(cells, stable=True).indices
    counts = torch.bincount(cells, minlength=batch_size * ny * nx)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@needs_extension
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_plan_is_a_stable_grouping_by_cell(dtype):
    # 3 x 9 x 11 cells: the planes (99 cells) are not a multiple of the kernels' 64-cell tiles.
    features, coords = lifted_points(2000, 1, 3, 9, 11, 4, crowd=300)
    order, offsets = torch.ops.v2xfuse.bev_pool_plan(coords.to(dtype), 3, 9, 11)
    assert order.dtype == offsets.dtype == torch.int32
    expected_order, expected_offsets = _stable_grouping(coords, 3, 9, 11)
    assert torch.equal(order.long(), expected_order)
    assert torch.equal(offsets.long(), expected_offsets)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_all_points_in_one_cell(impl):
    features, _ = lifted_points(5000, 5, 2, 3, 70, 5, torch.float64)
    coords = torch.tensor([[1, 2, 69]]).expand(5000, 3)
    f = features.clone().requires_grad_(True)
    out = IMPLS[impl](f, coords, 2, 3, 70)
    expected = torch.zeros(2, 5, 3, 70, dtype=torch.float64)
    expected[1, :, 2, 69] = features.sum(0)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad)
    assert torch.equal(f.grad, grad[1, :, 2, 69].expand(5000, 5))


@needs_extension
def test_sparse_grid_matches_reference_and_cuda_order():
    # Most of the kernels' 64-cell tiles empty (written as zeros without a sum), a few cells
    # crowded; the backward is a gather in both, so bitwise equal.
    g = torch.Generator().manual_seed(6)
    batch_size, ny, nx, channels, n_points = 4, 40, 50, 32, 20000
    features = torch.randn(n_points, channels, generator=g)
    hot = torch.randint(0, batch_size * ny * nx, (30,), generator=g)
    cells = hot[torch.randint(0, 30, (n_points,), generator=g)]
    coords = torch.stack([cells // (ny * nx), cells // nx % ny, cells % nx], dim=1).int()
    f_op = features.clone().requires_grad_(True)
    f_ref = features.clone().requires_grad_(True)
    out_op = ops.bev_pool(f_op, coords, batch_size, ny, nx)
    out_ref = reference.bev_pool(f_ref, coords, batch_size, ny, nx)
    torch.testing.assert_close(out_op, out_ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out_op.abs().sum(1)) == cells.unique().numel()
    grad = torch.randn(out_op.shape, generator=g)
    out_op.backward(grad)
    out_ref.backward(grad)
    assert torch.equal(f_op.grad, f_ref.grad)


@needs_extension
def test_planned_ops_equal_the_coords_ops():
    features, coords = lifted_points(3000, 7, 2, 13, 17, 7, crowd=200)
    order, offsets = torch.ops.v2xfuse.bev_pool_plan(coords, 2, 13, 17)
    out = torch.ops.v2xfuse.bev_pool_forward_planned(features, order, offsets, 2, 13, 17)
    assert torch.equal(out, torch.ops.v2xfuse.bev_pool_forward(features, coords, 2, 13, 17))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.ops.v2xfuse.bev_pool_backward_planned(grad, order, offsets),
                       torch.ops.v2xfuse.bev_pool_backward(grad, coords))
    with pytest.raises(RuntimeError, match="offsets must be"):
        torch.ops.v2xfuse.bev_pool_forward_planned(features, order, offsets, 2, 13, 16)
    with pytest.raises(RuntimeError, match="order must have one entry per point"):
        torch.ops.v2xfuse.bev_pool_forward_planned(features[:10], order, offsets, 2, 13, 17)
    with pytest.raises(ValueError, match=r"coords\[0\].*outside the grid"):
        torch.ops.v2xfuse.bev_pool_plan(torch.tensor([[0, 13, 0]]), 2, 13, 17)


@needs_extension
def test_half_precision_backward_is_a_gather():
    features, coords = lifted_points(500, 4, 2, 5, 6, 9, torch.bfloat16)
    f = features.clone().requires_grad_(True)
    out = ops.bev_pool(f, coords, 2, 5, 6)
    grad = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(grad)
    c = coords.long()
    assert torch.equal(f.grad, grad[c[:, 0], :, c[:, 1], c[:, 2]])


def _lift_case(seed=0, points=4000, rows=300, channels=8, batch=2, ny=9, nx=11):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(points, generator=g)
    values = torch.randn(rows, channels, generator=g)
    row_of = torch.randint(0, rows, (points,), generator=g)
    coords = torch.stack([torch.randint(0, batch, (points,), generator=g),
                          torch.randint(0, ny, (points,), generator=g),
                          torch.randint(0, nx // 2, (points,), generator=g)], 1).int()
    return weights, values, row_of, coords, batch, ny, nx  # the right half of x stays empty


def test_weighted_pool_is_the_pool_of_the_lifted_rows_bit_for_bit():
    w, v, rows, coords, b, ny, nx = _lift_case()
    got = ops.bev_pool_weighted(w, v, rows, coords, b, ny, nx)
    want = ops.bev_pool(w[:, None] * v[rows], coords, b, ny, nx)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, reference.bev_pool_weighted(w, v, rows, coords, b, ny, nx))
    assert got[..., nx // 2:].abs().sum() == 0


def test_weighted_pool_gradients_are_those_of_the_lifted_rows():
    w, v, rows, coords, b, ny, nx = _lift_case(seed=1)
    grad = torch.randn(b, v.shape[1], ny, nx, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (ops.bev_pool_weighted, reference.bev_pool_weighted):
        wi, vi = w.clone().requires_grad_(True), v.clone().requires_grad_(True)
        fn(wi, vi, rows, coords, b, ny, nx).backward(grad)
        grads.append((wi.grad, vi.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    again_w, again_v = w.clone().requires_grad_(True), v.clone().requires_grad_(True)
    ops.bev_pool_weighted(again_w, again_v, rows, coords, b, ny, nx).backward(grad)
    assert torch.equal(again_w.grad, grads[0][0]) and torch.equal(again_v.grad, grads[0][1])


@needs_extension
@pytest.mark.parametrize("rows_apart", [True, False], ids=["rows_in_one_plane", "rows_shared"])
def test_weighted_pool_gradients_do_not_depend_on_the_threads(rows_apart):
    # LSS: each image row (a pixel of one camera) lies in one sample's plane, and the planes
    # then run in parallel; rows shared between planes make them run one after the other
    w, v, rows, coords, b, ny, nx = _lift_case(seed=5, points=20000, rows=400, batch=4)
    if rows_apart:
        coords[:, 0] = (rows % b).int()
    grad = torch.randn(b, v.shape[1], ny, nx, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            wi, vi = w.clone().requires_grad_(True), v.clone().requires_grad_(True)
            ops.bev_pool_weighted(wi, vi, rows, coords, b, ny, nx).backward(grad)
            grads.append((wi.grad, vi.grad))
    finally:
        torch.set_num_threads(threads)
    for got in grads[1:]:
        assert torch.equal(got[0], grads[0][0]) and torch.equal(got[1], grads[0][1])
    wr, vr = w.clone().requires_grad_(True), v.clone().requires_grad_(True)
    reference.bev_pool_weighted(wr, vr, rows, coords, b, ny, nx).backward(grad)
    torch.testing.assert_close(grads[0][0], wr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], vr.grad, atol=1e-4, rtol=1e-5)


@needs_extension
def test_weighted_pool_bfloat16_gradients_sum_in_float():
    w, v, rows, coords, b, ny, nx = _lift_case(seed=7, points=6000, rows=20)
    grad = torch.randn(b, v.shape[1], ny, nx, generator=torch.Generator().manual_seed(8))
    wh, vh = (t.bfloat16().requires_grad_(True) for t in (w, v))
    ops.bev_pool_weighted(wh, vh, rows, coords, b, ny, nx).backward(grad.bfloat16())
    wf, vf = (t.bfloat16().float().requires_grad_(True) for t in (w, v))
    reference.bev_pool_weighted(wf, vf, rows, coords, b, ny, nx).backward(grad.bfloat16().float())
    assert wh.grad.dtype == vh.grad.dtype == torch.bfloat16
    # ~300 points per row: summed in bfloat16 the error would be tens of ulps; in float, one
    # rounding
    torch.testing.assert_close(vh.grad.float(), vf.grad, atol=0, rtol=2 ** -8)
    torch.testing.assert_close(wh.grad.float(), wf.grad, atol=1e-2, rtol=2 ** -7)


@needs_extension
def test_weighted_pool_gradcheck_float64():
    w, v, rows, coords, b, ny, nx = _lift_case(seed=3, points=60, rows=7, channels=3)
    w, v = w.double().requires_grad_(True), v.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c: ops.bev_pool_weighted(a, c, rows, coords, b, ny, nx), (w, v))


def test_weighted_pool_refuses_bad_rows_and_arguments():
    w, v, rows, coords, b, ny, nx = _lift_case(points=20, rows=5)
    bad = rows.clone()
    bad[7] = 5
    with pytest.raises(ValueError, match=r"rows\[7\] = 5 is not a row of the 5 values"):
        ops.bev_pool_weighted(w, v, bad, coords, b, ny, nx)
    with pytest.raises(ValueError, match="one dtype"):
        ops.bev_pool_weighted(w.double(), v, rows, coords, b, ny, nx)
    with pytest.raises(ValueError, match="outside the grid"):
        ops.bev_pool_weighted(w, v, rows, coords, 1, ny, nx)
    with pytest.raises(ValueError, match="integer"):
        ops.bev_pool_weighted(w, v, rows.float(), coords, b, ny, nx)


def test_weighted_pool_without_the_extension_is_the_same(monkeypatch):
    w, v, rows, coords, b, ny, nx = _lift_case(seed=4)
    with_ext = ops.bev_pool_weighted(w, v, rows, coords, b, ny, nx)
    monkeypatch.setattr(ops, "_use_extension", lambda: False)
    torch.testing.assert_close(ops.bev_pool_weighted(w, v, rows, coords, b, ny, nx), with_ext)
