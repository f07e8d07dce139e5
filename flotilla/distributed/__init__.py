from flotilla.distributed.groups import ParallelGroup, destroy_groups, get_group, init_groups

__all__ = ["ParallelGroup", "destroy_groups", "get_group", "init_groups"]
