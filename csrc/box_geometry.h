// Rotated-box geometry shared by the CPU and CUDA kernels (HOST_DEVICE, float or double).
//
// Boxes are rows [x, y, z, dx, dy, dz, yaw] (v2xfuse/structures/boxes.py): z is the box centre,
// dx the length along the heading, yaw radians counter-clockwise from +x.
//
// BEV intersection: box A is expressed in box B's frame, where B is the axis-aligned rectangle
// [-hx, hx] x [-hy, hy], and A's quad is clipped by B's four half-planes (Sutherland-Hodgman).
// Clipping keeps the vertex order, so no angular sort is needed, and each clipped vertex is put
// exactly on B's edge. Working relative to B's centre keeps float32 precise for small boxes far
// from the origin. The only division is dp / (dp - dq) with dp >= 0 > dq, which is in [0, 1].
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define V2X_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define V2X_HOST_DEVICE inline
#endif

namespace v2xfuse {

// One box prepared for pairwise tests: centre, half extents and cos/sin of yaw.
template <typename T>
struct RotBox {
  T x, y, z;
  T hx, hy, hz;  // half extents, made non-negative
  T c, s;        // cos(yaw), sin(yaw)
  T radius;      // half diagonal in BEV: the box lies in this circle around (x, y)
};

// Box-pair quantities computed by pair_value().
enum PairMode : int { kOverlapBev = 0, kIouBev = 1, kIou3d = 2 };

// Clipping a convex n-gon by one half-plane adds at most one vertex (4 -> 8 after four planes);
// the slack absorbs extra crossings that rounding can create on near-degenerate quads.
constexpr int kMaxPolygonVertices = 16;

V2X_HOST_DEVICE void sin_cos(float a, float* s, float* c) {
  *s = sinf(a);
  *c = cosf(a);
}

V2X_HOST_DEVICE void sin_cos(double a, double* s, double* c) {
  *s = sin(a);
  *c = cos(a);
}

V2X_HOST_DEVICE float sqrt_(float v) { return sqrtf(v); }
V2X_HOST_DEVICE double sqrt_(double v) { return sqrt(v); }

template <typename T>
V2X_HOST_DEVICE T abs_(T v) {
  return v < T(0) ? -v : v;
}

template <typename T>
V2X_HOST_DEVICE T min_(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
V2X_HOST_DEVICE T max_(T a, T b) {
  return a > b ? a : b;
}

// row: [x, y, z, dx, dy, dz, yaw]. Negative extents describe the same rectangle as their
// absolute values, so they are folded (the corner order would otherwise turn clockwise).
template <typename T>
V2X_HOST_DEVICE RotBox<T> make_rot_box(const T* row) {
  RotBox<T> b;
  b.x = row[0];
  b.y = row[1];
  b.z = row[2];
  b.hx = abs_(row[3]) * T(0.5);
  b.hy = abs_(row[4]) * T(0.5);
  b.hz = abs_(row[5]) * T(0.5);
  sin_cos(row[6], &b.s, &b.c);
  b.radius = sqrt_(b.hx * b.hx + b.hy * b.hy);
  return b;
}

template <typename T>
V2X_HOST_DEVICE T bev_area(const RotBox<T>& b) {
  return T(4) * b.hx * b.hy;
}

// Clip polygon (ix, iy, n) by the half-plane  sign * coord <= h,  coord = x (along_y false) or y.
// Writes at most kMaxPolygonVertices vertices to (ox, oy) and returns their number.
template <typename T>
V2X_HOST_DEVICE int clip_by_half_plane(const T* ix, const T* iy, int n, T* ox, T* oy,
                                       bool along_y, T sign, T h) {
  int m = 0;
  if (n == 0) return 0;
  T px = ix[n - 1], py = iy[n - 1];
  T dp = h - sign * (along_y ? py : px);
  for (int k = 0; k < n; ++k) {
    const T qx = ix[k], qy = iy[k];
    const T dq = h - sign * (along_y ? qy : qx);
    const bool p_in = dp >= T(0), q_in = dq >= T(0);
    if (p_in != q_in && m < kMaxPolygonVertices) {
      const T t = dp / (dp - dq);  // dp and dq have opposite signs: t in [0, 1]
      if (along_y) {
        ox[m] = px + t * (qx - px);
        oy[m] = sign * h;
      } else {
        ox[m] = sign * h;
        oy[m] = py + t * (qy - py);
      }
      ++m;
    }
    if (q_in && m < kMaxPolygonVertices) {
      ox[m] = qx;
      oy[m] = qy;
      ++m;
    }
    px = qx;
    py = qy;
    dp = dq;
  }
  return m;
}

// Area of the intersection of the two boxes' BEV rectangles (z ignored).
template <typename T>
V2X_HOST_DEVICE T bev_overlap(const RotBox<T>& a, const RotBox<T>& b) {
  if (!(a.hx > T(0) && a.hy > T(0) && b.hx > T(0) && b.hy > T(0))) return T(0);
  const T ddx = a.x - b.x, ddy = a.y - b.y;
  const T reach = a.radius + b.radius;
  if (ddx * ddx + ddy * ddy > reach * reach) return T(0);

  // A's centre and half axes in B's frame; cos/sin of yaw_a - yaw_b by the difference formulas.
  const T cx = b.c * ddx + b.s * ddy;
  const T cy = -b.s * ddx + b.c * ddy;
  const T c = a.c * b.c + a.s * b.s;
  const T s = a.s * b.c - a.c * b.s;
  const T ux = c * a.hx, uy = s * a.hx;   // half length along A's heading
  const T vx = -s * a.hy, vy = c * a.hy;  // half width, A's left

  T bufx[2][kMaxPolygonVertices], bufy[2][kMaxPolygonVertices];
  // Corners counter-clockwise from front-right, as box_corners() orders them.
  bufx[0][0] = cx + ux - vx; bufy[0][0] = cy + uy - vy;
  bufx[0][1] = cx + ux + vx; bufy[0][1] = cy + uy + vy;
  bufx[0][2] = cx - ux + vx; bufy[0][2] = cy - uy + vy;
  bufx[0][3] = cx - ux - vx; bufy[0][3] = cy - uy - vy;
  int n = 4;
  n = clip_by_half_plane(bufx[0], bufy[0], n, bufx[1], bufy[1], false, T(1), b.hx);
  n = clip_by_half_plane(bufx[1], bufy[1], n, bufx[0], bufy[0], true, T(1), b.hy);
  n = clip_by_half_plane(bufx[0], bufy[0], n, bufx[1], bufy[1], false, T(-1), b.hx);
  n = clip_by_half_plane(bufx[1], bufy[1], n, bufx[0], bufy[0], true, T(-1), b.hy);
  if (n < 3) return T(0);

  // Shoelace, fanned from the first vertex to keep the cross products small.
  const T* x = bufx[0];
  const T* y = bufy[0];
  T twice_area = T(0);
  for (int k = 1; k + 1 < n; ++k) {
    twice_area += (x[k] - x[0]) * (y[k + 1] - y[0]) - (x[k + 1] - x[0]) * (y[k] - y[0]);
  }
  const T area = abs_(twice_area) * T(0.5);
  return min_(area, min_(bev_area(a), bev_area(b)));
}

template <typename T>
V2X_HOST_DEVICE T height_overlap(const RotBox<T>& a, const RotBox<T>& b) {
  const T top = min_(a.z + a.hz, b.z + b.hz);
  const T bottom = max_(a.z - a.hz, b.z - b.hz);
  return max_(top - bottom, T(0));
}

// Intersection over union; 0 when the union is empty (two degenerate boxes).
template <typename T>
V2X_HOST_DEVICE T safe_iou(T inter, T size_a, T size_b) {
  const T uni = size_a + size_b - inter;
  return uni > T(0) ? inter / uni : T(0);
}

template <typename T>
V2X_HOST_DEVICE T iou_bev(const RotBox<T>& a, const RotBox<T>& b) {
  return safe_iou(bev_overlap(a, b), bev_area(a), bev_area(b));
}

template <typename T>
V2X_HOST_DEVICE T pair_value(const RotBox<T>& a, const RotBox<T>& b, int mode) {
  if (mode == kOverlapBev) return bev_overlap(a, b);
  if (mode == kIouBev) return iou_bev(a, b);
  const T dz = height_overlap(a, b);
  const T inter = dz > T(0) ? bev_overlap(a, b) * dz : T(0);
  return safe_iou(inter, bev_area(a) * T(2) * a.hz, bev_area(b) * T(2) * b.hz);
}

}  // namespace v2xfuse
