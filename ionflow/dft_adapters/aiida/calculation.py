"""The ``ionflow.label`` CalcJob: a batch of reference calculations run by ``ionflow label-batch``."""

from __future__ import annotations

import json

from aiida import orm
from aiida.common.datastructures import CalcInfo, CodeInfo
from aiida.engine import CalcJob

from ionflow.dft_adapters.batch import BATCH_FILE, DONE_FILE, RESULTS_FILE, STRUCTURES_FILE

#: ionflow status -> the exit code a batch ends with when that is its worst status. A batch's
#: exit status is that of its worst structure (incomplete > failed > timeout > unconverged > ok);
#: each structure's own status is in the results and in ionflow's calculation rows.
STATUS_EXIT_CODES = {"ok": 0, "unconverged": 310, "timeout": 320, "failed": 330}
EXIT_INCOMPLETE = 340
EXIT_NO_RESULTS = 350


class LabelCalculation(CalcJob):
    """Label a batch of structures with one of ionflow's reference adapters on an AiiDA computer.

    Inputs: ``parameters`` (adapter, settings, workers, threads, timeout: the contents of
    ``batch.json``), ``structures`` (an extxyz file) and ``code`` (the ``ionflow`` executable on
    the computer). Outputs: ``summary`` (counts per ionflow status, structures without a result)
    and the retrieved ``results.jsonl`` (one result per structure).
    """

    @classmethod
    def define(cls, spec):  # noqa: ANN001  (AiiDA's signature)
        super().define(spec)
        spec.input("parameters", valid_type=orm.Dict, help="The batch: adapter, settings, workers, threads, timeout.")
        spec.input("structures", valid_type=orm.SinglefileData, help="The structures (extxyz).")
        spec.inputs["metadata"]["options"]["parser_name"].default = "ionflow.label"
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
        spec.inputs["metadata"]["options"]["withmpi"].default = False
        spec.output("summary", valid_type=orm.Dict, help="Counts per ionflow status; indexes without a result.")
        spec.exit_code(
            STATUS_EXIT_CODES["unconverged"],
            "ERROR_UNCONVERGED",
            message="Some calculations did not converge (ionflow status 'unconverged').",
        )
        spec.exit_code(
            STATUS_EXIT_CODES["timeout"],
            "ERROR_TIMEOUT",
            message="Some calculations passed their time limit (ionflow status 'timeout').",
        )
        spec.exit_code(
            STATUS_EXIT_CODES["failed"], "ERROR_FAILED", message="Some calculations failed (ionflow status 'failed')."
        )
        spec.exit_code(
            EXIT_INCOMPLETE,
            "ERROR_INCOMPLETE",
            message="The job ended before every structure had a result ({missing} of {n}): killed, lost by the "
            "scheduler or out of walltime.",
        )
        spec.exit_code(
            EXIT_NO_RESULTS,
            "ERROR_NO_RESULTS",
            invalidates_cache=True,
            message="The job left no results file: it did not start or died before its first result.",
        )

    def prepare_for_submission(self, folder) -> CalcInfo:  # noqa: ANN001
        with folder.open(BATCH_FILE, "w", encoding="utf8") as handle:
            json.dump(self.inputs.parameters.get_dict(), handle)
        code = CodeInfo()
        code.code_uuid = self.inputs.code.uuid
        code.cmdline_params = ["label-batch", "."]
        code.stdout_name = "ionflow.out"
        code.stderr_name = "ionflow.err"
        info = CalcInfo()
        info.codes_info = [code]
        info.local_copy_list = [
            (self.inputs.structures.uuid, self.inputs.structures.filename, STRUCTURES_FILE),
        ]
        info.retrieve_list = [RESULTS_FILE, DONE_FILE, "ionflow.err"]
        return info
