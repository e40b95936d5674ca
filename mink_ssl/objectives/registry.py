"""The objective registry: ``@OBJECTIVES.register("name")`` on each objective class."""
from mink_ssl.registry import Registry

OBJECTIVES: Registry = Registry("objective")
