"""The ``ionflow.label`` parser: the batch's summary and an exit code for its worst status."""

from __future__ import annotations

from aiida import orm
from aiida.parsers import Parser

from ionflow.dft_adapters.batch import RESULTS_FILE, read_results, read_structures_count

#: the exit code of a complete batch is its worst status's (see ``STATUS_EXIT_CODES``)
_WORST_FIRST = ("failed", "timeout", "unconverged")


class LabelParser(Parser):
    """Reads ``results.jsonl``; the results themselves go to ionflow's database (the campaign
    reads them from the retrieved folder), the counts to the ``summary`` output."""

    def parse(self, **kwargs):  # noqa: ANN003, ANN201  (AiiDA's signature)
        # the scheduler's verdict, set on the node before the parser runs: a job out of walltime keeps
        # its exit code (120), by which the campaign records the structures without a result as timeouts
        walltime = self.node.exit_status == self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status
        retrieved = self.retrieved
        names = retrieved.base.repository.list_object_names()
        n = read_structures_count(self.node.inputs.structures.get_content())
        if RESULTS_FILE not in names:
            return self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME if walltime else self.exit_codes.ERROR_NO_RESULTS
        results = read_results(retrieved.base.repository.get_object_content(RESULTS_FILE))
        counts: dict[str, int] = {}
        for result in results.values():
            counts[result.status] = counts.get(result.status, 0) + 1
        missing = sorted(set(range(n)) - set(results))
        self.out("summary", orm.Dict({"n": n, "counts": counts, "missing": missing}))
        if missing:
            if walltime:
                return self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME
            return self.exit_codes.ERROR_INCOMPLETE.format(missing=len(missing), n=n)
        for status in _WORST_FIRST:
            if counts.get(status):
                return self.exit_codes[f"ERROR_{status.upper()}"]
        return None
