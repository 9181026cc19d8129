"""What a model is and does, whatever its shape: every layer at any depth, the variables its
forward pass uses, the inputs it takes, the features it returns.

Keras lists a model's layers one level at a time (`Model.layers`), and a custom Layer's
sublayers not at all in public API; a subclassed model declares no inputs or outputs and may
hold layers its `call` never uses (old classifier heads). tlloop's trainability, BatchNorm
policy, random-state checkpointing and heads are defined on what this module finds:

- `all_layers`: every layer below a layer, depth first in the order each container lists its
  sublayers (a functional model: graph order; a subclassed model or custom Layer: the order
  `__init__` set them), each shared layer once.
- `used_variables`: the variables one traced call of the backbone reads (a functional graph of
  built-in layers uses all it holds, so it is not traced).
- `input_spec` / `feature_shape`: the backbone's inputs (declared, or recorded by its first
  call) and the shape of one example's features (declared, or from one call).
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

try:  # Keras 3 keeps the functional model class private
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover
    _Functional = ()


def sublayers(layer) -> list:
    """The layers `layer` holds directly, in the order it lists them: a functional model's
    graph order first, then any other layer it holds as an attribute."""
    held = [child for child in getattr(layer, "_layers", ()) if isinstance(child, keras.Layer)]
    if isinstance(layer, _Functional):
        graph = list(layer.layers)
        ids = {id(child) for child in graph}
        return graph + [child for child in held if id(child) not in ids]
    return held


def all_layers(layer, include_self: bool = False) -> list:
    """Every layer below `layer` (and `layer` itself first with `include_self`), depth first,
    each once however often it is shared."""
    found, seen = [], set()

    def visit(current) -> None:
        if id(current) in seen:
            return
        seen.add(id(current))
        found.append(current)
        for child in sublayers(current):
            visit(child)

    visit(layer)
    return found if include_self else found[1:]


def leaf_layers(layer) -> list:
    """The layers at any depth inside `layer` that hold no sublayers, each once (`[layer]` for a
    layer that holds none)."""
    return [item for item in all_layers(layer, include_self=True) if not sublayers(item)]


def own_weights(layer) -> list:
    """The weights `layer` creates itself, not those of its sublayers."""
    if not sublayers(layer):
        return list(layer.weights)
    own = getattr(layer, "_trainable_variables", []) + getattr(
        layer, "_non_trainable_variables", []
    )
    return list(own)


def set_own_trainable(layer, value: bool) -> None:
    """Makes `layer`'s own weights trainable or not, leaving its sublayers as they are (Keras'
    `trainable` setter would set every sublayer too)."""
    if not sublayers(layer):
        layer.trainable = value
        return
    # As the setter does for its own weights; a container stays trainable, else it hides the
    # weights of every sublayer.
    for variable in getattr(layer, "_trainable_variables", []):
        variable.trainable = value


def seed_generators(layer) -> list:
    """Every keras.random.SeedGenerator held by `layer` or any layer below it, each once: in
    layer order, then each layer's attributes in the order they were set."""
    found, seen = [], set()
    for item in all_layers(layer, include_self=True):
        candidates = [v for v in vars(item).values() if isinstance(v, keras.random.SeedGenerator)]
        candidates += list(getattr(item, "_seed_generators", ()))
        for generator in candidates:
            if id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


def batch_norms(layer) -> list:
    """Every BatchNormalization at any depth in `layer` (itself included), each once."""
    return [
        item
        for item in all_layers(layer, include_self=True)
        if isinstance(item, keras.layers.BatchNormalization)
    ]


def declared_input_spec(backbone):
    """TensorSpecs of the inputs `backbone` declares (any batch size), in their structure;
    None if it declares none (a subclassed model or a layer)."""
    inputs = getattr(backbone, "inputs", None)
    if not inputs:
        return None
    structure = getattr(backbone, "_inputs_struct", None)
    structure = structure if structure is not None else inputs

    def spec(tensor):
        name = getattr(tensor, "name", None) or None
        return tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=name)

    return tf.nest.map_structure(spec, structure)


def input_spec(backbone):
    """TensorSpecs (any batch size) of what `backbone` takes, in its structure: its declared
    inputs, else the shapes of its first call (float32); None if it has neither."""
    declared = declared_input_spec(backbone)
    if declared is not None:
        return declared
    shapes = getattr(backbone, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    (shape,) = shapes.values()
    return _specs(shape, batched=True)


def _specs(shape, batched: bool):
    """TensorSpecs for a shape or a dict/list of shapes; `batched`: the first dim is a batch."""

    def is_shape(value) -> bool:
        return isinstance(value, (tuple, list)) and all(
            d is None or isinstance(d, (int, np.integer)) for d in value
        )

    def spec(value):
        dims = tuple(value)[1:] if batched else tuple(value)
        return tf.TensorSpec((None, *dims), tf.float32)

    if is_shape(shape):
        return spec(shape)
    if isinstance(shape, dict):
        return {key: _specs(value, batched) for key, value in shape.items()}
    if isinstance(shape, (tuple, list)):
        return type(shape)(_specs(value, batched) for value in shape)
    raise TypeError(f"not a shape: {shape!r}")


def feature_shape(backbone, input_shape=None) -> tuple[int, ...]:
    """The shape of one example's features from `backbone`: its declared single output, else
    the output of one call, on its input spec or on `input_shape` (one example's input shape,
    or a dict of them). Raises ValueError naming `input_shape` when there is nothing to call
    it on, or the output is not one tensor."""
    if input_shape is None:
        outputs = getattr(backbone, "outputs", None)
        if outputs and len(outputs) == 1:
            return tuple(outputs[0].shape[1:])
        spec = input_spec(backbone)
    else:
        try:
            spec = _specs(input_shape, batched=False)
        except TypeError:
            raise ValueError(
                f"input_shape={input_shape!r}: not a shape; accepted: one example's input shape, "
                "e.g. (224, 224, 3), or a dict of them for a dict input"
            ) from None
    name = type(backbone).__name__
    if spec is None:
        raise ValueError(
            f"input_shape: the backbone ({name}) declares no inputs and was never called, so "
            "its feature shape cannot be probed; accepted: input_shape=one example's input "
            "shape, e.g. (224, 224, 3), or the feature shape in place of the backbone, e.g. "
            "(7, 7, 1280)"
        )
    specs = tf.nest.flatten(spec)
    output = None
    if backbone.built:  # no weights to create: a symbolic call, unknown sizes allowed
        symbolic = tf.nest.map_structure(lambda s: keras.KerasTensor(s.shape, s.dtype.name), spec)
        try:
            output = backbone.compute_output_spec(symbolic, training=False)
        except Exception:  # some layers cannot run symbolically: a real call below
            output = None
    if output is None:
        if not all(s.shape[1:].is_fully_defined() for s in specs):
            raise ValueError(
                f"input_shape: the backbone ({name}) takes {spec}, with unknown sizes to "
                "probe it on; accepted: input_shape=one example's input shape, e.g. (224, 224, 3)"
            )
        sample = tf.nest.map_structure(lambda s: tf.zeros((1, *s.shape[1:]), s.dtype), spec)
        output = backbone(sample, training=False)
    flat = tf.nest.flatten(output)
    if len(flat) != 1:
        raise ValueError(
            f"features: the backbone ({name}) returns {len(flat)} tensors; accepted: a backbone "
            "that returns one feature map or vector (cut or wrap it), or the feature shape"
        )
    return tuple(flat[0].shape[1:])


# By backbone: the ids of the variables its forward pass reads (None: all it holds).
_USED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_graph(layer) -> bool:
    """True if every layer at any depth is in the graph of a functional model or Sequential
    (then a call uses every layer there is, and no trace is needed)."""
    for item in all_layers(layer, include_self=True):
        children = sublayers(item)
        if not children:
            continue
        if isinstance(item, keras.Sequential):
            continue
        if not isinstance(item, _Functional) or len(children) != len(item.layers):
            return False
    return True


def used_variables(backbone, spec=None, before=None) -> set[int] | None:
    """The ids of the variables (Keras variables) one call of `backbone` in inference mode
    reads, traced on its declared inputs, else on `spec` (a batch of the data, passed through
    `before`, the augment submodule), else on the shapes of its first call. None when every
    variable it holds is used (a functional graph of built-in layers: not traced), or it could
    not be traced (then all count as used, with a warning). Computed once per backbone."""
    if backbone in _USED:
        return _USED[backbone]
    used = None
    if not _all_graph(backbone):
        declared = getattr(backbone, "inputs", None)
        if not declared and spec is not None:
            used = _trace(backbone, spec, before)
        elif input_spec(backbone) is not None:
            used = _trace(backbone, input_spec(backbone), None)
        else:
            logging.warning(
                "%s declares no inputs and was never called: every layer it holds counts as "
                "used by its forward pass",
                backbone.name,
            )
    _USED[backbone] = used
    return used


def _trace(backbone, spec, before) -> set[int] | None:
    def call(inputs):
        if before is not None:
            inputs = before(inputs)
        return backbone(inputs, training=False)

    function = tf.function(call)
    try:
        graph = function.get_concrete_function(spec).graph
    except Exception as error:  # a user's model may not trace: count everything as used
        logging.warning(
            "%s could not be traced to find the layers its forward pass uses (%s: %s): every "
            "layer it holds counts as used",
            backbone.name,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )
        return None
    read = {id(variable) for variable in graph.variables}
    used = set()
    for variable in backbone.variables:
        value = getattr(variable, "value", variable)
        forms = [value, getattr(value, "_primary", None), *getattr(value, "values", ())]
        if any(id(form) in read for form in forms if form is not None):
            used.add(id(variable))
    return used


def is_used(layer, used: set[int] | None) -> bool:
    """True if `used` (from `used_variables`) holds any of `layer`'s own weights, or is None."""
    return used is None or any(id(v) in used for v in own_weights(layer))
