"""Jobs: the jobs table's life cycle (queue, claim, lease, finish) and every task name."""
