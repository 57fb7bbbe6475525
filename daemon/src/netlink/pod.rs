//! Netlink calls for pod networking (veth, bridge, addresses and routes inside a pod's netns).
//! CONTRACT (owner: CNI helper).
