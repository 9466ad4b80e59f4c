//! The host as a node agent deployed in a pod must see it: the node's network namespace (node
//! work happens there whatever namespace the agent process has) and cgroups of their own for
//! incoming VMs (outside the agent container's, so they outlive it).
//!
//! | module | what it owns |
//! |---|---|
//! | [`netns`] | checking `--host-netns`, sockets created inside the host's namespace |
//! | [`cgroup`] | pure: hierarchies from mountinfo, the directories and files of a VM's cgroup |
//! | [`placement`] | creating a VM's cgroups, moving a child into them before exec, removing them |

pub mod cgroup;
pub mod netns;
pub mod placement;
