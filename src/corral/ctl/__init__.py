"""The operator side of the `corral` command: admin API client, tables, commands, flags."""
