"""meshredirect as a chained CNI plugin (``meshredirect-cni``), with its installer.

The container runtime calls the plugin when a pod's network is created,
after the main plugin (Calico, bridge...): ADD compiles the pod's policy and
loads the rules into the pod's network namespace, DEL removes them, CHECK
compares what is installed with what the policy compiles to, VERSION lists
the specification versions spoken (0.4.0 and 1.0.0).

- :mod:`meshredirect.cni.protocol`: the CNI protocol (environment, configuration, results, errors); pure.
- :mod:`meshredirect.cni.config`: the plugin's configuration fields.
- :mod:`meshredirect.cni.pods` and :mod:`meshredirect.cni.annotations`: pod annotations to policy.
- :mod:`meshredirect.cni.rules`: the seam to the apply layer.
- :mod:`meshredirect.cni.plugin`: the four commands.
- :mod:`meshredirect.cni.install`: inserting the plugin into the node's conflist, watching, uninstalling.
- :mod:`meshredirect.cni.main`: the ``meshredirect-cni`` executable.

See docs/cni.md.
"""
