"""Evaluation: perplexity (strided, as transformers' perplexity guide computes it), few-shot tasks,
scaling laws, emergence and visuals.

    perplexity / text_perplexity            lmforge.eval.perplexity
    load_task / evaluate_task / loglikelihood   lmforge.eval.tasks  (make_task: lmforge.eval.make_tasks)
    sweep / fit_law / predict               lmforge.eval.scaling
    emergence                               lmforge.eval.emergence
    attention_maps / training_dashboard     lmforge.eval.viz
    LmforgeLM (lm-evaluation-harness)       lmforge.eval.harness  (needs lm_eval)
"""

from lmforge.eval.perplexity import PerplexityResult, TextPerplexity, perplexity, text_perplexity
from lmforge.eval.tasks import Task, TaskResult, evaluate_task, evaluate_tasks, load_task, loglikelihood

__all__ = [
    "PerplexityResult", "TextPerplexity", "perplexity", "text_perplexity",
    "Task", "TaskResult", "evaluate_task", "evaluate_tasks", "load_task", "loglikelihood",
]
