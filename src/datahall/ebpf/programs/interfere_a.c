/* Tenant A's XDP program: re-marks the DSCP of every IPv4 packet (rewriting the TOS byte that
 * tenant B reads), drops DNS over UDP before B runs, and counts into a map B also writes. */
#include "common.h"

#define DSCP_AF41 (34 << 2)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shared_stats SEC(".maps");

SEC("xdp")
int xdp_tenant_a(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	__u32 slot = 0;
	__u64 *count;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return XDP_PASS;

	count = bpf_map_lookup_elem(&shared_stats, &slot);
	if (count)
		__sync_fetch_and_add(count, 1);

	if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(iph + 1);

		if ((void *)(udp + 1) <= data_end && udp->dest == bpf_htons(53))
			return XDP_DROP;
	}
	/* Re-mark DSCP (checksum left stale on purpose: a policy should see the write). */
	iph->tos = DSCP_AF41 | (iph->tos & 3);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
