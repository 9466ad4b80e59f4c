//! Netlink: links, routes, tunnels, qdiscs, netns threads (in progress).
