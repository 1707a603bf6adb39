"""The executor on hand-built graphs: semantics (static folding, If, gradients, jit, vmap)
and every bad input the issue lists (unsupported operator, unresolvable shape, wrong
input shape or dtype), each reported with the node, operator and reason up front."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_executor_conformance import LISTED
from weightatlas.core.executor import (
    InputMismatchError,
    UnsupportedOperatorError,
    from_onnx,
    onnx_backend,
    supported_operators,
)
from weightatlas.core.executor._graph import MAX_SUBGRAPH_DEPTH
from weightatlas.core.executor._registry import OPS, OpDef
from weightatlas.errors import (
    FormatError,
    ResourceLimitError,
    ShapeError,
    UnsupportedError,
    WeightAtlasError,
)

F32, I64 = TensorProto.FLOAT, TensorProto.INT64



def value(name: str, elem: int, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto] | None = None,
          opset: int = 17, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))


def test_every_listed_operator_is_covered():
    assert sorted(set(LISTED) - set(supported_operators())) == []


# Bad input: operators, attributes and control flow the executor cannot trace


def test_unsupported_operator_names_node_and_operator():
    m = model([helper.make_node("Relu", ["x"], ["h"]),
               helper.make_node("NonMaxSuppression", ["h", "h"], ["y"], name="nms")],
              [value("x", F32, [1, 4, 4])], [value("y", I64, None)], name="detector")
    with pytest.raises(UnsupportedOperatorError,
                       match=r"detector: node 'nms' \(NonMaxSuppression\): operator "
                             r"'NonMaxSuppression' is not supported"):
        from_onnx(m)


def test_unsupported_operator_inside_an_if_branch_is_found_up_front():
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="inner")],
                               "b", [], [value("u", F32, None)])
    m = model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
              [value("c", TensorProto.BOOL, []), value("x", F32, [3])], [value("y", F32, None)])
    with pytest.raises(UnsupportedOperatorError, match=r"node 'inner' \(Unique\)"):
        from_onnx(m)


def test_operator_in_another_domain_is_refused():
    node = helper.make_node("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft")
    m = model([node], [value("x", F32, [2, 2])], [value("y", F32, [2, 2])])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedOperatorError, match=r"domain 'com.microsoft' is not supported"):
        from_onnx(m)


@pytest.mark.parametrize(("node", "reason"), [
    (helper.make_node("Pad", ["x", "p"], ["y"], mode="mirror"), r"mode='mirror' is not one of"),
    (helper.make_node("Gelu", ["x"], ["y"], approximate="erf"), r"approximate='erf' is not"),
    (helper.make_node("Resize", ["x", "", "p"], ["y"], mode="area"), r"mode='area' is not one"),
    (helper.make_node("Conv", ["x", "x"], ["y"], auto_pad="FULL"), r"auto_pad='FULL' is not"),
    (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING), r"casting to string"),
    (helper.make_node("Loop", ["p", "p"], ["y"]), r"Loop runs a subgraph a data-dependent"),
    (helper.make_node("RandomNormal", [], ["y"], shape=[2]), r"RandomNormal draws random numbers"),
], ids=["pad-mode", "gelu-mode", "resize-mode", "auto-pad", "cast-string", "loop", "random"])
def test_unsupported_attributes_and_control_flow_are_refused_up_front(node, reason):
    node.name = "n1"
    m = model([node], [value("x", F32, [1, 1, 4]), value("p", I64, [6])],
              [value("y", F32, None)])
    with pytest.raises(UnsupportedOperatorError, match=rf"node 'n1' \({node.op_type}\): {reason}"):
        from_onnx(m)


def test_if_on_an_input_with_branches_of_different_shapes_is_reported():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["a"])], "t", [],
                             [value("a", F32, None)])
    other = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["b"], axis=0)], "e", [],
                              [value("b", F32, None)])
    m = model([helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=then,
                                else_branch=other)],
              [value("c", TensorProto.BOOL, []), value("x", F32, [3])], [value("y", F32, None)])
    with pytest.raises(UnsupportedOperatorError,
                       match=r"node 'branchy' \(If\): the condition depends on the graph inputs "
                             r"and the branches give different outputs \(then: float32\[3\]; "
                             r"else: float32\[6\]\)"):
        from_onnx(m, static_inputs=())


# Bad input: shapes that cannot be resolved


def test_reshape_target_that_depends_on_an_input_is_reported():
    m = model([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")],
              [value("x", F32, [2, 3]), value("s", I64, [2])], [value("y", F32, None)])
    with pytest.raises(ShapeError, match=r"node 'r' \(Reshape\): the target shape depends on "
                                         r"the values of the graph inputs"):
        from_onnx(m, static_inputs=())


def test_shape_inputs_are_found_and_made_static():
    # Reshape(x, Concat(Shape(x)[0:1], s)): s feeds the target through Concat.
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Slice", ["shp", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "s"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0]), "zero"),
             numpy_helper.from_array(np.array([1]), "one")]
    m = model(nodes, [value("x", F32, ["b", 6]), value("s", I64, [2])],
              [value("y", F32, None)], inits)
    fn = from_onnx(m)
    assert fn.static_inputs == frozenset({"s"})
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(fn(x, np.array([3, 2]))[0], x.reshape(2, 3, 2))
    np.testing.assert_array_equal(fn(x, np.array([2, 3]))[0], x.reshape(2, 2, 3))
    with pytest.raises(InputMismatchError, match=r"input 's' is static .* must be a concrete"):
        jax.jit(fn.apply)({}, x, jnp.array([3, 2]))


def test_impossible_reshape_is_reported_when_the_function_is_made():
    target = numpy_helper.from_array(np.array([4, 2]), "t")
    m = model([helper.make_node("Reshape", ["x", "t"], ["y"], name="r")],
              [value("x", F32, [2, 3])], [value("y", F32, None)], [target])
    with pytest.raises(ShapeError, match=r"node 'r' \(Reshape\): cannot reshape \[2, 3\] \(6 "
                                         r"elements\) to \[4, 2\] \(8 elements\)"):
        from_onnx(m)


def test_broadcast_mismatch_names_node_and_input_shapes():
    m = model([helper.make_node("Add", ["x", "z"], ["y"], name="plus")],
              [value("x", F32, [2, 3]), value("z", F32, [4])], [value("y", F32, None)])
    with pytest.raises(ShapeError, match=r"node 'plus' \(Add\): cannot be computed for inputs "
                                         r"\(float32\[2, 3\], float32\[4\]\)"):
        from_onnx(m)


def test_node_reading_an_undefined_value_is_a_format_error():
    m = model([helper.make_node("Relu", ["h"], ["y"], name="late"),
               helper.make_node("Relu", ["x"], ["h"])],
              [value("x", F32, [2])], [value("y", F32, [2])])
    with pytest.raises(FormatError, match=r"node 'late' \(Relu\) reads 'h', which no graph "
                                          r"input, initializer or earlier node defines"):
        from_onnx(m)


def test_deeply_nested_subgraphs_are_refused():
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "leaf", [],
                             [value("y0", F32, None)])
    graph = leaf
    for depth in range(MAX_SUBGRAPH_DEPTH + 1):
        node = helper.make_node("If", ["c"], [f"y{depth + 1}"], then_branch=graph,
                                else_branch=leaf)
        graph = helper.make_graph([node], f"g{depth}", [], [value(f"y{depth + 1}", F32, None)])
    m = model(list(graph.node), [value("c", TensorProto.BOOL, []), value("x", F32, [2])],
              [value(f"y{MAX_SUBGRAPH_DEPTH + 1}", F32, None)])
    with pytest.raises(ResourceLimitError, match=r"nested more than 16 levels deep"):
        from_onnx(m)


# Bad input: inputs and weights


@pytest.fixture
def linear() -> onnx.ModelProto:
    """y = x @ w + b with x: float32[n, 3], w: [3, 2], b: [2]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"])]
    return model(nodes, [value("x", F32, ["n", 3])], [value("y", F32, ["n", 2])], inits,
                 name="linear")


def test_wrong_input_shape_is_reported(linear):
    fn = from_onnx(linear)
    with pytest.raises(ShapeError, match=r"linear: input 'x' must have shape float32\[n, 3\], "
                                         r"got \[4, 5\] \(axis 1\)"):
        fn(np.ones((4, 5), np.float32))
    with pytest.raises(ShapeError, match=r"input 'x' must have shape float32\[n, 3\] \(rank 2\)"):
        fn(np.ones(3, np.float32))


def test_symbolic_dimensions_must_agree_across_inputs():
    m = model([helper.make_node("Add", ["a", "b"], ["y"])],
              [value("a", F32, ["n", 2]), value("b", F32, ["n", 2])], [value("y", F32, None)])
    with pytest.raises(ShapeError, match=r"input 'b' has n=3 on axis 0, but an earlier input "
                                         r"has n=2"):
        from_onnx(m)(np.ones((2, 2), np.float32), np.ones((3, 2), np.float32))


def test_wrong_input_dtype_and_count_are_reported(linear):
    fn = from_onnx(linear)
    with pytest.raises(InputMismatchError, match=r"input 'x' must be float32, got float64 "
                                                 r"\(convert it with .astype\(np.float32\)\)"):
        fn(np.ones((2, 3)))
    with pytest.raises(InputMismatchError, match=r"expects 1 inputs \['x'\], got 2"):
        fn(np.ones((2, 3), np.float32), np.ones(1, np.float32))
    with pytest.raises(UnsupportedError, match=r"input 'x' holds str32 values; the executor "
                                               r"computes numeric"):
        fn(np.full((2, 3), "a"))


def test_wrong_weights_are_reported(linear):
    with pytest.raises(InputMismatchError, match=r"no initializer or input named 'W'; did you "
                                                 r"mean 'w'\?"):
        from_onnx(linear, {"W": np.zeros((3, 2), np.float32)})
    with pytest.raises(ShapeError, match=r"weight 'w' must have shape float32\[3, 2\], got "
                                         r"\[2, 3\]"):
        from_onnx(linear, {"w": np.zeros((2, 3), np.float32)})
    fn = from_onnx(linear)
    with pytest.raises(InputMismatchError, match=r"weight 'b' must be float32, got int32"):
        fn.apply({"b": np.zeros(2, np.int32)}, np.ones((1, 3), np.float32))
    with pytest.raises(InputMismatchError, match=r"no weight named 'bb'; did you mean 'b'"):
        fn.apply({"bb": np.zeros(2, np.float32)}, np.ones((1, 3), np.float32))


def test_external_data_is_never_opened(linear, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(6, 7, np.float32).tobytes())
    w = linear.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../" + secret.name)
    path = tmp_path / "sub" / "linear.onnx"
    path.parent.mkdir()
    onnx.save(linear, str(path))
    with pytest.raises(InputMismatchError, match=r"linear.onnx: tensor 'w' is stored as external "
                                                 r"data, which the executor never opens"):
        from_onnx(path)
    given = np.eye(3, 2, dtype=np.float32)
    fn = from_onnx(path, {"w": given})
    x = np.ones((1, 3), np.float32)
    b = numpy_helper.to_array(linear.graph.initializer[1])
    np.testing.assert_allclose(fn(x)[0], x @ given + b, rtol=1e-6)


def test_errors_surface_before_any_operator_computes(monkeypatch):
    """An eager call traces abstractly first: the failing last node stops it before the
    first node runs on real values."""
    seen: list[bool] = []
    relu = OPS["Relu"]

    def spy(c, x):
        seen.append(not isinstance(x, jax.core.Tracer))
        return relu.fn(c, x)

    monkeypatch.setitem(OPS, "Relu", OpDef("Relu", spy))
    target = numpy_helper.from_array(np.array([5]), "t")
    m = model([helper.make_node("Relu", ["x"], ["h"]),
               helper.make_node("Reshape", ["h", "t"], ["y"], name="last")],
              [value("x", F32, ["n"])], [value("y", F32, None)], [target])
    fn = from_onnx(m)
    with pytest.raises(ShapeError, match=r"node 'last' \(Reshape\): cannot reshape \[4\]"):
        fn.apply({}, np.ones(4, np.float32))
    assert seen == [False]  # traced once, never run on concrete values


def test_every_error_is_a_weightatlas_error():
    for cls in (UnsupportedOperatorError, InputMismatchError):
        assert issubclass(cls, WeightAtlasError)


# Semantics


def test_weight_gradients_match_the_closed_form(linear):
    fn = from_onnx(linear)
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)

    def loss(weights):
        return jnp.sum(fn.apply(weights, x)[0] ** 2)

    grads = jax.jit(jax.grad(loss))(fn.weights)
    w, b = fn.weights["w"].astype(np.float64), fn.weights["b"].astype(np.float64)
    residual = 2 * (x.astype(np.float64) @ w + b)
    np.testing.assert_allclose(grads["w"], x.T.astype(np.float64) @ residual, rtol=1e-5)
    np.testing.assert_allclose(grads["b"], residual.sum(axis=0), rtol=1e-5)


def test_apply_is_pure_under_jit_vmap_and_eager(linear):
    fn = from_onnx(linear)
    xs = np.random.default_rng(2).standard_normal((5, 1, 3)).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda x: fn.apply(fn.weights, x)[0]))(xs)
    for i, x in enumerate(xs):
        eager = fn.apply(fn.weights, x)[0]
        expected = x.astype(np.float64) @ fn.weights["w"] + fn.weights["b"]
        np.testing.assert_allclose(eager, expected, rtol=1e-5)
        np.testing.assert_allclose(batched[i], expected, rtol=1e-5)


def test_constant_if_is_resolved_and_the_other_branch_never_traced():
    bad = helper.make_graph(  # would fail: 3 elements cannot become [2, 2]
        [const("t", np.array([2, 2])), helper.make_node("Reshape", ["x", "t"], ["r"])],
        "bad", [], [value("r", F32, None)])
    good = helper.make_graph([helper.make_node("Neg", ["x"], ["r2"])], "good", [],
                             [value("r2", F32, None)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ReduceProd", ["s"], ["n"], keepdims=0),
             const("three", np.array(3)),
             helper.make_node("Equal", ["n", "three"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=good, else_branch=bad)]
    fn = from_onnx(model(nodes, [value("x", F32, [3])], [value("y", F32, None)]))
    np.testing.assert_array_equal(fn(np.array([1, 2, 3], np.float32))[0], [-1, -2, -3])


def test_if_on_an_input_becomes_a_cond_under_jit():
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["a"])], "t", [],
                             [value("a", F32, None)])
    other = helper.make_graph([helper.make_node("Exp", ["x"], ["b"])], "e", [],
                              [value("b", F32, None)])
    m = model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
              [value("c", TensorProto.BOOL, []), value("x", F32, [3])], [value("y", F32, None)])
    fn = from_onnx(m, static_inputs=())
    run = jax.jit(fn.apply)
    x = np.array([0.5, 1.0, 2.0], np.float32)
    np.testing.assert_allclose(run({}, jnp.asarray(True), x)[0], -x)
    np.testing.assert_allclose(run({}, jnp.asarray(False), x)[0], np.exp(x), rtol=1e-6)


def test_shape_arithmetic_is_exact_in_64_bits():
    """INT64_MAX slice ends pass through folded Concat/Unsqueeze unchanged, although JAX
    computes in 32 bits by default (a 32-bit fold would turn them into -1)."""
    big = np.iinfo(np.int64).max
    nodes = [const("end", np.array(big)), const("ax", np.array([0])),
             helper.make_node("Unsqueeze", ["end", "ax"], ["ends"]),
             const("start", np.array([1])),
             helper.make_node("Concat", ["start"], ["starts"], axis=0),
             helper.make_node("Slice", ["x", "starts", "ends"], ["y"])]
    fn = from_onnx(model(nodes, [value("x", F32, [5])], [value("y", F32, None)]))
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(fn(x)[0], x[1:])


def test_large_static_values_stay_in_the_program_instead_of_being_baked_in():
    """A ConstantOfShape of 90,000 elements is computed in the compiled program, not
    folded into a 360 kB literal."""
    shape = numpy_helper.from_array(np.array([300, 300]), "shape")
    fill = numpy_helper.from_array(np.array([0.5], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"], value=fill),
             helper.make_node("Add", ["x", "c"], ["y"])]
    fn = from_onnx(model(nodes, [value("x", F32, [300, 300])], [value("y", F32, None)],
                         [shape]))
    x = np.ones((300, 300), np.float32)
    text = jax.jit(fn.apply).lower(fn.weights, x).as_text()
    assert len(text) < 20_000
    np.testing.assert_array_equal(fn(x)[0], x + 0.5)


def test_eval_shape_and_repr(linear):
    fn = from_onnx(linear)
    (out,) = fn.eval_shape(jax.ShapeDtypeStruct((7, 3), jnp.float32))
    assert out.shape == (7, 2) and out.dtype == jnp.float32
    assert repr(fn) == "OnnxFunction('linear', inputs=(x: float32[n, 3]), weights=2, nodes=2)"


def test_backend_runs_a_node_and_casts_to_declared_dtypes():
    backend = onnx_backend()
    node = helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)
    x = np.array([[1, 5, 2], [7, 0, 3]], np.float32)
    (y,) = backend.run_node(node, [x])
    assert y.dtype == np.int32  # the graph run_node builds declares no output type
    np.testing.assert_array_equal(y, [1, 0])
    m = model([node], [value("x", F32, [2, 3])], [value("y", I64, [2])])
    (y64,) = backend.prepare(m, jit=True).run({"x": x})
    assert y64.dtype == np.int64 and backend.supports_device("CPU")
    np.testing.assert_array_equal(y64, [1, 0])


def test_replacing_a_weight_is_seen_by_the_compiled_call(linear):
    fn = from_onnx(linear)
    x = np.ones((1, 3), np.float32)
    before = np.asarray(fn(x)[0])
    fn.weights["b"] = fn.weights["b"] + np.float32(1)
    np.testing.assert_allclose(fn(x)[0], before + 1, rtol=1e-6)
