/* A small XDP L4 load balancer: packets to a known VIP (address, port, protocol) get a backend
 * chosen by a hash of the 5-tuple; the destination address and MAC are rewritten, the IPv4 and
 * TCP/UDP checksums fixed, and the packet is sent out again (XDP_TX, or bpf_redirect when the
 * backend names an interface). */
#include "common.h"

#define MAX_BACKENDS 64

struct vip_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct vip_meta {
	__u32 first_backend; /* index into backends */
	__u32 backend_count;
};

struct backend {
	__u32 addr;
	__u32 ifindex; /* 0: bounce out of the receiving interface */
	unsigned char mac[ETH_ALEN];
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct vip_key);
	__type(value, struct vip_meta);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

/* A small integer mix of the 5-tuple (not cryptographic). */
static __noinline __u32 flow_hash(struct flow_key *key)
{
	__u32 h = 0x9e3779b9;

	h ^= key->saddr;
	h *= 0x85ebca6b;
	h ^= key->daddr;
	h = (h << 13) | (h >> 19);
	h ^= ((__u32)key->sport << 16) | key->dport;
	h *= 0xc2b2ae35;
	h ^= key->proto;
	h ^= h >> 16;
	return h;
}

static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__s64 sum = bpf_csum_diff(&from, sizeof(from), &to, sizeof(to), ~((__u32)check) & 0xffff);

	return csum_fold(sum);
}

SEC("xdp")
int xdp_l4lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct flow_key flow = {};
	struct vip_key vip = {};
	struct vip_meta *meta;
	struct backend *be;
	struct iphdr *iph;
	__u16 *l4_check = 0;
	__u32 idx, old_daddr;

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return XDP_DROP;
	if (iph->ihl != 5)
		return XDP_PASS;

	flow.saddr = iph->saddr;
	flow.daddr = iph->daddr;
	flow.proto = iph->protocol;
	if (iph->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(iph + 1);

		if ((void *)(tcp + 1) > data_end)
			return XDP_DROP;
		flow.sport = tcp->source;
		flow.dport = tcp->dest;
		l4_check = &tcp->check;
	} else if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(iph + 1);

		if ((void *)(udp + 1) > data_end)
			return XDP_DROP;
		flow.sport = udp->source;
		flow.dport = udp->dest;
		if (udp->check)
			l4_check = &udp->check;
	} else {
		return XDP_PASS;
	}

	vip.addr = flow.daddr;
	vip.port = flow.dport;
	vip.proto = flow.proto;
	meta = bpf_map_lookup_elem(&vips, &vip);
	if (!meta || meta->backend_count == 0)
		return XDP_PASS;
	idx = meta->first_backend + flow_hash(&flow) % meta->backend_count;
	be = bpf_map_lookup_elem(&backends, &idx);
	if (!be)
		return XDP_DROP;

	old_daddr = iph->daddr;
	iph->daddr = be->addr;
	iph->check = csum_replace4(iph->check, old_daddr, be->addr);
	if (l4_check)
		*l4_check = csum_replace4(*l4_check, old_daddr, be->addr);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	if (be->ifindex)
		return bpf_redirect(be->ifindex, 0);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
