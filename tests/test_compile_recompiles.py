"""`compile: true` as users run it (quantize, compile, train): one graph for training, one recompile for eval.

Dynamo's own backend interface counts the graphs: every compilation of a frame (a first compile, a recompile
after a failed guard, each piece after a graph break) calls the backend once. The backend here is dynamo's
"eager" (no Inductor code generation), since only the graph count is under test.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import run_cli


def _counting_backend(graphs: list):
    """A dynamo backend that runs each graph as traced and appends it to `graphs`: one entry per compilation."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend


# PACT's traceable path in the slow tier (35 s each): one compiled method keeps the count in the fast suite.
@pytest.mark.parametrize("method", ["lsq", pytest.param("pact_dorefa", marks=pytest.mark.slow)])
def test_compiled_fit_compiles_one_training_graph_and_at_most_one_recompile(method, digits_fast_args,
                                                                             monkeypatch):
    graphs: list = []
    counting_backend = _counting_backend(graphs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    status = run_cli("fit", *digits_fast_args, "--model.init_args.compile", "true", "--trainer.limit_train_batches",
                     "4", "--quantization.method", method, "--quantization.weight_bits", "4")
    torch._dynamo.reset()
    assert status == 0
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    # training (train mode) and evaluation (eval mode: validation and test, whatever their batch sizes)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs compiled"


def test_a_restored_pact_network_evaluates_compiled_without_a_training_batch():
    """`test` from a checkpoint never trains, so PACT's first-batch check never runs there: a network whose
    state was loaded counts as checked, and its evaluation is compiled at once instead of running eagerly."""
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model
    from quantizers.compiling import compile_after_initialization

    graphs: list = []
    counting_backend = _counting_backend(graphs)

    spec = QuantSpec(method="pact_dorefa", weight_bits=4)
    trained = quantize_model(build_model("resnet20", 10), spec)
    net = quantize_model(build_model("resnet20", 10), spec)
    net.load_state_dict(trained.state_dict())
    net.eval()
    torch._dynamo.reset()
    compile_after_initialization(net, backend=counting_backend)
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
    torch._dynamo.reset()
    assert len(graphs) == 1, "evaluation of a restored PACT network ran eagerly"


def _lsq_resnet20():
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model

    torch.manual_seed(0)
    return quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", weight_bits=4))


def test_prepare_initialises_the_quantizers_as_the_first_training_step_would_and_leaves_the_rest():
    from quantizers import prepare, unready_quantizers

    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prepared, stepped = _lsq_resnet20(), _lsq_resnet20()
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    prepared.eval()
    rng = torch.get_rng_state()
    assert prepare(prepared, images) is prepared
    assert not unready_quantizers(prepared) and not prepared.training  # ready, and its mode given back
    assert torch.equal(torch.get_rng_state(), rng)
    # a network that draws random numbers in training mode (the matched-noise control resamples every step):
    # prepare's pass leaves the generator where it was
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model

    noisy = quantize_model(build_model("resnet20", 10), QuantSpec(method="noise", weight_bits=4))
    rng = torch.get_rng_state()
    prepare(noisy, images)
    assert torch.equal(torch.get_rng_state(), rng)
    noisy.train()
    noisy(images)
    assert not torch.equal(torch.get_rng_state(), rng)  # which it does move when not prepared
    stepped.train()
    stepped(images)  # what the first training step's forward does
    after, theirs = prepared.state_dict(), stepped.state_dict()
    quantizer_keys = [k for k in after if "quantizer" in k]
    assert any(k.endswith("input_quantizer.step") for k in quantizer_keys)
    for key in after:
        if key in quantizer_keys:  # the quantizers hold what the first training step sets
            assert torch.equal(after[key], theirs[key]), key
        else:  # everything else as it was: BatchNorm statistics included (the training step moved them)
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(theirs["bn1.running_mean"], before["bn1.running_mean"])


def test_a_prepared_network_compiled_by_hand_trains_in_one_graph():
    """The library path: quantize, prepare, torch.compile, train. Without prepare the same loop compiles the
    quantizers' first-batch branch and recompiles once they are ready."""
    from quantizers import parameter_groups, prepare

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % 10

    def graphs_of_three_steps(prepared: bool) -> int:
        net = _lsq_resnet20().train()
        if prepared:
            prepare(net, images)
        graphs: list = []
        torch._dynamo.reset()
        compiled = torch.compile(net, backend=_counting_backend(graphs))
        optimizer = torch.optim.SGD(parameter_groups(net, 1e-4), lr=0.01, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(compiled(images), labels).backward()
            optimizer.step()
        torch._dynamo.reset()
        return len(graphs)

    assert graphs_of_three_steps(prepared=True) == 1
    assert graphs_of_three_steps(prepared=False) > 1
