/* XDP firewall: drop IPv4 packets whose source is on a deny list, or whose TCP/UDP destination
 * port is the blocked port; pass everything else.  Verdicts are counted in a legacy map. */
#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);   /* IPv4 source address, network byte order */
	__type(value, __u64); /* packets dropped for this source */
} deny_list SEC(".maps");

/* Legacy (pre-BTF) map definition: one counter per XDP action. */
struct bpf_map_def SEC("maps") verdict_count = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = 5,
	.map_flags = 0,
};

/* Set by the loader before load (lives in .rodata). */
const volatile __u16 blocked_port = 23;

static __noinline int count_verdict(__u32 action)
{
	__u64 *count = bpf_map_lookup_elem(&verdict_count, &action);

	if (count)
		__sync_fetch_and_add(count, 1);
	return action;
}

SEC("xdp")
int xdp_firewall(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	__u16 dport = 0;
	__u64 *hits;
	__u32 saddr;

	if ((void *)(eth + 1) > data_end)
		return count_verdict(XDP_DROP);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count_verdict(XDP_PASS);
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return count_verdict(XDP_DROP);

	saddr = iph->saddr;
	hits = bpf_map_lookup_elem(&deny_list, &saddr);
	if (hits) {
		__sync_fetch_and_add(hits, 1);
		return count_verdict(XDP_DROP);
	}

	if (iph->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(iph + 1);

		if ((void *)(tcp + 1) > data_end)
			return count_verdict(XDP_DROP);
		dport = tcp->dest;
	} else if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(iph + 1);

		if ((void *)(udp + 1) > data_end)
			return count_verdict(XDP_DROP);
		dport = udp->dest;
	}
	if (dport && dport == bpf_htons(blocked_port))
		return count_verdict(XDP_DROP);
	return count_verdict(XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
