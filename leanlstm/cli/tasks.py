"""``leanlstm tasks``: the registered tasks, their metrics and their presets."""
from __future__ import annotations

import click

from ..tasks import get_task, task_names


@click.command("tasks")
def command():
    """List the tasks (for --task), each with its metric and presets (for --preset; * marks the default)."""
    for name in task_names():
        task = get_task(name)
        direction = "higher is better" if task.higher_is_better else "lower is better"
        click.echo(f"{name}: {task.metric_label or task.metric} ({task.metric}, {direction})")
        for preset_name, preset in task.presets.items():
            mark = "*" if preset_name == task.default_preset else " "
            click.echo(f"  {mark}{preset_name:12s} {preset.description}")
