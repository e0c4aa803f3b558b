"""TeacherLM seqio tasks and mixtures. `import tasks` registers all of them (gin files import it, as in T5X).

Training corpora and curriculum: `tasks.corpora`; zero-shot evaluation: `tasks.evaluation`; students and
user datasets: `tasks.students`; where data lives, caps, bad-record policy and vocabulary: `tasks.config`; prompt
formats: `tasks.rendering`. Look names up with `tasks.get_mixture_or_task(name)`.
"""

from tasks import corpora, evaluation
from tasks.registry import all_names, get_mixture_or_task

corpora.register()
evaluation.register()

__all__ = ["all_names", "get_mixture_or_task"]
