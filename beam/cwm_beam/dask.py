"""A distributed Beam runner that runs here: Beam's DaskRunner with two gaps closed.

Beam's own ``apache_beam.runners.dask.dask_runner.DaskRunner`` (2.77, shipped with apache-beam's
``dask`` extra) cannot run the data steps as they are written, found by running them on it:

1. **Tagged outputs are not routed.** It keys each transform's output bag by the producing
   transform and drops the output tags, so every consumer of a multi-output ``ParDo``
   (``.with_outputs(...)``: dead letters, excluded programs) receives the main output's
   elements (the traces step failed with ``TypeError: unhashable type: 'dict'`` counting them).
2. **Only the last sink runs.** It computes the bag of the last transform visited, so every
   branch that does not feed it (the dead-letter and counter writers) is silently skipped.

:class:`DaskRunner` here translates a ``ParDo`` so that each element keeps its output tag, gives
each consumer only its tag's elements, and computes every leaf of the graph. And where Beam's
turns a ``Reshuffle`` into nothing (all work then stays in the partitions the step's few source
descriptors were created in: one busy worker), it repartitions the bag over the cluster's
threads. Everything else is Beam's translation. Use it with the data steps' ``runtime.beam`` section::

    beam: {runner: cwm_beam.dask.DaskRunner, options: ["--dask_client_address=dask:8786"]}

where ``dask:8786`` is a ``dask.distributed`` scheduler whose workers run the Beam image (the
workers import the step's code). Beam metrics are not reported by Dask runs (Beam's runner does
not implement them); the manifests' counts come from the data, as on every runner.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import dask
import dask.bag as db
import dask.distributed as ddist
from apache_beam import pvalue
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor, PTransformOverride
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.overrides import dask_overrides
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.sideinputs import SideInputMap

MAIN = None  # the tag of a ParDo's main output
PARTITIONS_PER_THREAD = 1  # a Reshuffle spreads its elements over one partition per thread: a
# partition is a bundle, and a bundle sets its DoFns up (a sandbox pool) and tears them down


class _RedistributeFn(beam.DoFn):
    """Marks where a Reshuffle was: the visitor repartitions the bag there."""

    def process(self, element):
        yield element


class _Redistribute(beam.PTransform):
    def expand(self, pcoll):
        return pcoll | beam.ParDo(_RedistributeFn())


class _ReshuffleOverride(PTransformOverride):
    """Beam's DaskRunner turns a Reshuffle into nothing, so work stays in the partitions of the
    bag it came from (a step's few source descriptors: one partition each, one worker busy);
    here it becomes a repartition over the cluster's threads."""

    def matches(self, applied_ptransform: AppliedPTransform) -> bool:
        return applied_ptransform.transform.__class__ == beam.Reshuffle

    def get_replacement_transform_for_applied_ptransform(self, applied_ptransform):
        return _Redistribute()


def _tagged_bundle(items: Iterable[Any], invoker_args: list, invoker_kwargs: dict,
                   receivers: te.OneReceiver) -> list[tuple[str | None, Any]]:
    """Beam's ``apply_dofn_to_bundle``, keeping each output's tag: ``(tag, value)`` pairs."""
    invoker = te.DoFnInvoker.create_invoker(*invoker_args, **invoker_kwargs)
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    out = []
    for value in receivers.values:
        tag = value.tag if isinstance(value, TaggedOutput) else MAIN
        inner = value.value if isinstance(value, TaggedOutput) else value
        out.append((tag, te.defenestrate(inner)))
    return out


class TaggedParDo(te.ParDo):
    """Beam's ParDo translation whose bag holds ``(tag, value)`` pairs."""

    def apply(self, input_bag: Any, side_inputs: Any = None) -> db.Bag:
        # Beam's ParDo.apply builds the invoker arguments and maps apply_dofn_to_bundle over the
        # partitions; the same with the tag-keeping bundle function swapped in for the duration
        # of the call (graph construction only, on the thread that runs the pipeline; copying
        # Beam's 30-line body instead would fork it).
        original = te.apply_dofn_to_bundle
        te.apply_dofn_to_bundle = _tagged_bundle
        try:
            return super().apply(input_bag, side_inputs)
        finally:
            te.apply_dofn_to_bundle = original


def _with_tag(tag: str | None):
    def pick(pair: tuple[str | None, Any]) -> bool:
        return pair[0] == tag
    return pick


def _value(pair: tuple[str | None, Any]) -> Any:
    return pair[1]


class _Visitor(PipelineVisitor):
    """Builds one bag per leaf transform; a consumer of a ParDo reads only its tag."""

    def __init__(self, bag_kwargs: dict[str, Any], partitions: int) -> None:
        super().__init__()
        self.bag_kwargs = bag_kwargs
        self.partitions = partitions
        self.bags: dict[AppliedPTransform, db.Bag] = {}
        self.tagged: dict[AppliedPTransform, set[str]] = {}  # ParDo -> its side-output tags
        self.consumed: set[AppliedPTransform] = set()

    def bag_of(self, pcoll: pvalue.PValue) -> db.Bag | None:
        producer = pcoll.producer
        if producer not in self.bags:
            return None
        self.consumed.add(producer)
        bag = self.bags[producer]
        if producer not in self.tagged:
            return bag
        tag = pcoll.tag if pcoll.tag in self.tagged[producer] else MAIN
        return bag.filter(_with_tag(tag)).map(_value)

    def visit_transform(self, node: AppliedPTransform) -> None:
        if isinstance(getattr(node.transform, "fn", None), _RedistributeFn):
            (source,) = node.inputs
            bag = self.bag_of(source)
            assert bag is not None, "a Reshuffle's input comes first"
            self.bags[node] = bag.repartition(npartitions=self.partitions)
            return
        op_class: Any = te.TRANSLATIONS.get(node.transform.__class__, te.NoOp)
        if op_class is te.ParDo:
            op_class = TaggedParDo
        op = op_class(node, bag_kwargs=self.bag_kwargs)
        inputs = [None if isinstance(i, pvalue.PBegin) else self.bag_of(i) for i in node.inputs]
        inputs = [b for b in inputs if b is not None] or [None]
        kwargs: dict[str, Any] = {
            "input_bag": inputs if isinstance(op, te.Flatten) or len(inputs) > 1 else inputs[0],
            "side_inputs": None}
        if node.side_inputs:
            kwargs["side_inputs"] = [
                SideInputMap(type(si), si._view_options(),  # type: ignore[arg-type]
                             te.DaskBagWindowedIterator(self.bag_of(si.pvalue),  # type: ignore[arg-type]
                                                        si._window_mapping_fn))
                for si in node.side_inputs]
        self.bags[node] = op.apply(**kwargs)
        if op_class is TaggedParDo:  # side outputs asked for so far (DoOutputsTuple adds them)
            self.tagged[node] = node.transform.output_tags  # type: ignore[union-attr]

    def leaves(self) -> list[db.Bag]:
        return [bag for node, bag in self.bags.items() if node not in self.consumed]


class _Result(beam_dask.DaskRunnerResult):
    """Beam's result, closing the runner's client once the run has finished."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if PipelineState.is_terminal(self.state):
                self.client.close()


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner with tagged outputs routed and every sink computed (module doc)."""

    def run_pipeline(self, pipeline, options: PipelineOptions):
        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        pipeline.replace_all([_ReshuffleOverride(), *dask_overrides()])
        threads = sum(client.nthreads().values()) or 1
        visitor = _Visitor(bag_kwargs, partitions=PARTITIONS_PER_THREAD * threads)
        pipeline.visit(visitor)
        graph = dask.optimize(*visitor.leaves())
        return _Result(client, client.compute(list(graph)))
