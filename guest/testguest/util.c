/*
 * ftvm built-in test guest: memory helpers gcc may call, line formatting,
 * and the running FNV-1a checksum.
 */
#include "ftvm.h"

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;

	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

void line_reset(struct line *l)
{
	l->n = 0;
}

void line_ch(struct line *l, char c)
{
	if (l->n < LINE_CAP)
		l->b[l->n++] = c;
}

void line_str(struct line *l, const char *s)
{
	while (*s)
		line_ch(l, *s++);
}

void line_mem(struct line *l, const char *s, u32 n)
{
	while (n--)
		line_ch(l, *s++);
}

void line_dec(struct line *l, u64 v, u32 width)
{
	char t[20];
	u32 n = 0, i;

	do {
		t[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (i = n; i < width; i++)
		line_ch(l, '0');
	while (n)
		line_ch(l, t[--n]);
}

static const char hexdig[16] = "0123456789abcdef";

void line_hex(struct line *l, u64 v, u32 digits)
{
	u32 i;

	if (!digits) {
		u64 t = v;

		digits = 1;
		while (t >>= 4)
			digits++;
	}
	if (digits > 16)
		digits = 16;
	for (i = digits; i--;)
		line_ch(l, hexdig[(v >> (4 * i)) & 0xf]);
}

void line_escaped(struct line *l, u8 c)
{
	if (c == '"' || c == '\\') {
		line_ch(l, '\\');
		line_ch(l, (char)c);
	} else if (c >= 0x20 && c <= 0x7e) {
		line_ch(l, (char)c);
	} else {
		line_ch(l, '\\');
		line_ch(l, 'x');
		line_hex(l, c, 2);
	}
}

#define FNV_OFFSET_BASIS 0x811c9dc5u
#define FNV_PRIME 0x01000193u

static u32 running_sum;

void sum_init(void)
{
	running_sum = FNV_OFFSET_BASIS;
}

void sum_byte(u8 b)
{
	running_sum = (running_sum ^ b) * FNV_PRIME;
}

void sum_u64(u64 v)
{
	u32 i;

	for (i = 0; i < 8; i++) {
		sum_byte((u8)v);
		v >>= 8;
	}
}

u32 sum_get(void)
{
	return running_sum;
}
