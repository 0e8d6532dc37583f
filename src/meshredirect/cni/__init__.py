"""meshredirect as a chained CNI plugin (``meshredirect-cni``), with its installer.

The container runtime calls the plugin when a pod's network is created,
after the main plugin (Calico, bridge...): ADD compiles the pod's policy and
loads the rules into the pod's network namespace (the apply layer, iptables or
nftables), DEL removes them, CHECK reads them back and proves them equivalent
to what the policy compiles to, VERSION lists the specification versions
spoken (0.4.0 and 1.0.0).

- :mod:`meshredirect.cni.protocol`: the CNI protocol (environment, configuration, results, errors); pure.
- :mod:`meshredirect.cni.config`: the plugin's configuration fields.
- :mod:`meshredirect.cni.pods` and :mod:`meshredirect.cni.annotations`: pod annotations to policy
  (through the Istio front end's mapping).
- :mod:`meshredirect.cni.rules`: the apply layer's ``apply``/``cleanup``, and CHECK's read-back and proof.
- :mod:`meshredirect.cni.plugin`: the four commands.
- :mod:`meshredirect.cni.install`: inserting the plugin into the node's conflist, watching, uninstalling.
- :mod:`meshredirect.cni.main`: the ``meshredirect-cni`` executable.

See docs/cni.md.
"""
