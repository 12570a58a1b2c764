"""Commands built on the engine: inspect, bench, demo, eval, export, analysis, transfer to other toolkits."""
