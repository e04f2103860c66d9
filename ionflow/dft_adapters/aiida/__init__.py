"""Reference calculations through AiiDA (the optional ``ionflow[aiida]`` extra).

* :mod:`.calculation`: :class:`~.calculation.LabelCalculation`, the ``ionflow.label`` CalcJob: one
  batch of structures labelled on a computer AiiDA knows (``core.local``/``core.ssh`` transport,
  ``core.direct``/``core.slurm``/... scheduler) by ``ionflow label-batch``, i.e. ionflow's own
  adapters and pool on the remote side.
* :mod:`.parser`: :class:`~.parser.LabelParser`, the ``ionflow.label`` parser: exit codes that say
  the batch's worst ionflow status.
* :mod:`.dispatch`: what the label step calls: check a profile, computer, code and options before
  any work; submit a batch; find a submitted batch again; read the results of a finished one.

Only this subpackage imports aiida; the rest of ionflow runs without it.
"""


def check_dispatch(dispatch) -> None:  # noqa: ANN001  (ionflow.config.DispatchConfig)
    """Raise ``ValueError`` naming the problem, before any work, when a campaign's AiiDA target
    cannot take its jobs: aiida not installed; no such profile, computer or code; options the
    computer's scheduler refuses; a profile without a broker. Engine ``local``: nothing to check."""
    if dispatch.engine != "aiida":
        return
    try:
        from ionflow.dft_adapters.aiida import dispatch as aiida_dispatch
    except ImportError as exc:
        raise ValueError(
            f"reference.dispatch.engine is 'aiida' but AiiDA cannot be imported ({exc}); "
            "install it with `pip install ionflow[aiida]`"
        ) from None
    try:
        aiida_dispatch.check_target(dispatch.profile, dispatch.computer, dispatch.code, dispatch.options)
    except aiida_dispatch.DispatchError as exc:
        raise ValueError(f"reference.dispatch: {exc}") from None
